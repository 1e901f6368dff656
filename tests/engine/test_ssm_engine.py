"""The engine on Mamba / Mamba2 models: the per-sequence state cache beside the KV pool."""

import pytest
from tiny_models import SSM_FAMILIES, save_hf_model

from kiln.engine import LLM, SamplingParams
from kiln.errors import ConfigError

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def ssm_dir(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            out = tmp_path_factory.mktemp(name)
            cache[name] = (out, save_hf_model(name, out))
        return cache[name]

    return get


def _run(path, prompts, params=GREEDY, **engine_args):
    llm = LLM(str(path), device="cpu", **engine_args)
    out = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    llm.engine.block_manager.check_all_free()
    assert not llm.engine.runner.state_slots.slot_of  # every state slot came back
    return llm, [o.outputs[0].token_ids for o in out]


@pytest.mark.parametrize("name", list(SSM_FAMILIES))
def test_greedy_matches_transformers_in_mixed_batch(ssm_dir, random_prompts, hf_greedy, name):
    path, hf = ssm_dir(name)
    prompts = random_prompts((3, 19, 40, 9), seed=1)
    _, out = _run(path, prompts)
    assert out == [hf_greedy(hf, p, 8) for p in prompts]


@pytest.mark.parametrize("name", list(SSM_FAMILIES))
def test_chunked_prefill_and_preemption_give_same_tokens(ssm_dir, random_prompts, name):
    """Prompts cut into 16-token chunks carry their state from chunk to chunk; sequences
    preempted for want of blocks come back with a fresh state and recompute."""
    path, _ = ssm_dir(name)
    prompts = random_prompts((33, 7, 50, 16), seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    _, ref = _run(path, prompts, params)
    llm, out = _run(
        path, prompts, params, max_num_batched_tokens=16, num_kv_blocks=6, max_model_len=80
    )
    assert llm.engine.scheduler.num_preemptions > 0
    assert out == ref


def test_forked_siblings_copy_the_parent_state(ssm_dir, random_prompts):
    path, _ = ssm_dir("mamba")
    prompt = random_prompts((11,), seed=4)
    params = SamplingParams(n=3, temperature=0.0, max_tokens=12, ignore_eos=True)
    _, ref = _run(path, prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    llm = LLM(str(path), device="cpu")
    (out,) = llm.generate(prompt_token_ids=prompt, sampling_params=params)
    assert [c.token_ids for c in out.outputs] == ref * 3


def test_speculative_decoding_is_refused(ssm_dir):
    path, _ = ssm_dir("mamba")
    with pytest.raises(ConfigError, match="SSM layers"):
        LLM(
            str(path),
            device="cpu",
            speculative_config={"method": "ngram", "num_speculative_tokens": 2},
        )


def test_hybrid_engine_matches_reference_loop(tmp_path, random_prompts):
    """Attention and Mamba2 layers in one stack: the paged KV pool holds the attention layers
    only, the state pool the others; greedy equals the reference loop, with preemption."""
    import torch

    from kiln.config import ModelConfig
    from kiln.generate import generate
    from kiln.model.loader import save_model
    from kiln.model.transformer import Transformer

    hf = dict(
        model_type="llama", vocab_size=384, hidden_size=64, intermediate_size=128,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, layer_types=["mamba2", "attention", "mamba2"],
        mamba_state_size=8, mamba_head_dim=16, mamba_n_groups=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_hf(hf)).eval()
    model.init_weights(0.1)
    save_model(model, tmp_path)
    prompts = random_prompts((21, 9, 34), seed=5)
    new = 24
    ref = [generate(model, torch.tensor([p]), new)[0, len(p) :].tolist() for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    llm, out = _run(tmp_path, prompts, params, num_kv_blocks=4, max_model_len=64)
    assert llm.engine.runner.kv_cache.data.shape[1] == 1  # one attention layer in the pool
    assert llm.engine.scheduler.num_preemptions > 0
    assert out == ref


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(SSM_FAMILIES))
def test_gpu_engine_greedy_matches_transformers(ssm_dir, random_prompts, hf_greedy, name):
    """On CUDA the mixers run the Triton chunked scan and decode kernels."""
    path, hf = ssm_dir(name)
    prompts = random_prompts((3, 19, 70, 9), seed=6)
    llm = LLM(str(path), device="cuda", dtype="float32", max_num_batched_tokens=32)
    out = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    assert [o.outputs[0].token_ids for o in out] == [hf_greedy(hf, p, 8) for p in prompts]
