"""YaRN and dynamic NTK RoPE against transformers: the frequencies, the logits, greedy tokens."""

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import kiln
from kiln.config import ModelConfig
from kiln.engine import LLM, SamplingParams
from kiln.generate import generate
from kiln.model.layers import RotaryEmbedding


def _llama(rope_scaling, max_pos=256, head_dim=32):
    return dict(
        model_type="llama", vocab_size=64, hidden_size=128, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, head_dim=head_dim,
        max_position_embeddings=max_pos, rope_theta=10000.0, rope_scaling=rope_scaling,
    )  # fmt: skip


def _hf_cos_sin(hf_kwargs, positions):
    config = transformers.LlamaConfig(**hf_kwargs)
    rope = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = rope(x, positions[None])
    half = cos.shape[-1] // 2
    return torch.cat([cos[0, :, :half], sin[0, :, :half]], dim=-1)


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
         "beta_fast": 16, "beta_slow": 2, "truncate": False},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
         "mscale": 0.707, "mscale_all_dim": 1.0},
        {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128,
         "attention_factor": 1.3},
    ],
)  # fmt: skip
def test_yarn_table_matches_transformers(scaling):
    hf = _llama(scaling)
    table = RotaryEmbedding(ModelConfig.from_hf(hf)).cos_sin
    inv_freq, attention = ROPE_INIT_FUNCTIONS["yarn"](transformers.LlamaConfig(**hf), "cpu")
    assert attention != 1.0
    ref = _hf_cos_sin(hf, torch.arange(256))
    assert (table - ref).abs().max().item() < 1e-5


def test_dynamic_ntk_rows_match_transformers_token_by_token():
    """Row p is what transformers computes for a forward whose longest position is p."""
    hf = _llama({"rope_type": "dynamic", "factor": 3.0}, max_pos=64)
    config = ModelConfig.from_hf(hf)
    assert config.max_position_embeddings == 192
    table = RotaryEmbedding(config).cos_sin
    ref_short = _hf_cos_sin(hf, torch.arange(64))  # within the original context: plain RoPE
    assert (table[:64] - ref_short).abs().max().item() < 1e-5
    for p in (64, 100, 191):
        ref = _hf_cos_sin(hf, torch.tensor([p]))
        assert (table[p] - ref[0]).abs().max().item() < 1e-4 * max(1, p / 64)
    # and the round trip writes transformers' context back
    assert config.to_hf()["max_position_embeddings"] == 64


def test_dynamic_greedy_past_the_original_context(hf_model_dir):
    """7 prompt tokens + 32 generated: positions 24..38 use the grown base."""
    path, hf = hf_model_dir("llama_dynamic_rope")
    model = kiln.load_model(path, dtype="float32", device="cpu")
    ids = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf.generate(
            ids, max_new_tokens=32, do_sample=False, attention_mask=torch.ones_like(ids)
        )
    assert generate(model, ids, max_new_tokens=32).tolist() == ref.tolist()
    llm = LLM(str(path), device="cpu", max_num_batched_tokens=16, num_kv_blocks=4)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    out = llm.generate(prompt_token_ids=[ids[0].tolist()], sampling_params=params)
    assert out[0].outputs[0].token_ids == ref[0, 7:].tolist()
