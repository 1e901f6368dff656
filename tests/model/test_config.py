"""ModelConfig mapping of Hugging Face config fields."""

import json
import re

import pytest

from kiln.config import ModelConfig
from kiln.errors import ConfigError


def test_qwen2_sliding_window_only_when_enabled():
    base = dict(
        model_type="qwen2",
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        sliding_window=4,
    )
    assert ModelConfig.from_hf(base).sliding_windows == [None] * 4
    on = ModelConfig.from_hf({**base, "use_sliding_window": True, "max_window_layers": 2})
    assert on.sliding_windows == [None, None, 4, 4]
    assert ModelConfig.from_hf(base).qkv_bias and not ModelConfig.from_hf(base).o_bias


def test_layer_types_choose_windows():
    hf = dict(
        model_type="mistral",
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        sliding_window=3,
        layer_types=["sliding_attention", "full_attention"],
    )
    assert ModelConfig.from_hf(hf).sliding_windows == [3, None]


def test_legacy_rope_scaling_keys():
    hf = dict(
        model_type="llama",
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        rope_theta=5e5,
        rope_scaling={"type": "linear", "factor": 4.0},
    )
    cfg = ModelConfig.from_hf(hf)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_gpt2_defaults():
    cfg = ModelConfig.from_hf(dict(model_type="gpt2", vocab_size=10, n_embd=8, n_layer=1, n_head=2))
    assert cfg.intermediate_size == 32 and cfg.tie_word_embeddings and cfg.norm_type == "layernorm"
    assert cfg.position_embedding == "learned" and cfg.activation == "gelu_new"


def test_num_params_matches_model():
    from kiln.model import Transformer

    for hf in [
        dict(
            model_type="qwen3",
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            tie_word_embeddings=True,
        ),
        dict(model_type="gpt2", vocab_size=50, n_embd=16, n_layer=2, n_head=2),
    ]:
        cfg = ModelConfig.from_hf(hf)
        model = Transformer(cfg)
        extra = sum(
            p.numel()
            for n, p in model.named_parameters()
            if "norm" in n and p.dim() == 1 and cfg.norm_type == "layernorm" and n.endswith("bias")
        )
        extra += sum(p.numel() for n, p in model.named_parameters() if n.endswith("_norm.weight"))
        extra += sum(
            p.numel() for n, p in model.named_parameters() if n.endswith("bias") and "norm" not in n
        )
        assert cfg.num_params + extra == model.num_parameters()


LLAMA = dict(
    model_type="llama",
    vocab_size=10,
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"num_hidden_layers": -3}, "num_hidden_layers must be an integer >= 1, got -3"),
        ({"hidden_size": 0}, "hidden_size must be an integer >= 1, got 0"),
        ({"num_attention_heads": "2"}, "num_attention_heads must be an integer >= 1, got '2'"),
        ({"num_key_value_heads": 0}, "num_key_value_heads must be an integer >= 1, got 0"),
        ({"vocab_size": 10.5}, "vocab_size must be an integer"),
        ({"intermediate_size": True}, "intermediate_size must be an integer"),
        ({"head_dim": -1}, "head_dim must be an integer"),
        ({"vocab_size": None}, "lacks required field 'vocab_size'"),
        ({"rms_norm_eps": -1e-6}, "rms_norm_eps must be a number > 0"),
        ({"rope_theta": 0}, "rope_theta must be a number > 0"),
        ({"rope_scaling": {"rope_type": "linear"}}, "factor must be a number > 0"),
        ({"rope_scaling": "linear"}, "rope_scaling must be an object"),
        ({"hidden_act": ["silu"]}, "unsupported activation"),
        ({"sliding_window": -4}, "sliding_window must be an integer"),
        ({"layer_types": ["full_attention"], "sliding_window": 4}, "layer_types must list one"),
        ({"eos_token_id": [2, "x"]}, "eos_token_id must be a token id"),
        ({"model_type": "mixtral", "num_local_experts": 2, "num_experts_per_tok": 3}, "exceeds"),
    ],
)
def test_nonsense_values_are_config_errors_naming_the_field(changes, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        ModelConfig.from_hf({**LLAMA, **changes})


def test_gpt2_nonsense_sizes():
    gpt2 = dict(model_type="gpt2", vocab_size=10, n_embd=8, n_layer=1, n_head=2)
    with pytest.raises(ConfigError, match="n_layer must be an integer >= 1, got 0"):
        ModelConfig.from_hf({**gpt2, "n_layer": 0})
    with pytest.raises(ConfigError, match="n_embd=8 is not a multiple of n_head=3"):
        ModelConfig.from_hf({**gpt2, "n_head": 3})


@pytest.mark.parametrize(
    "content, match",
    [
        (json.dumps({**LLAMA, "num_hidden_layers": -3}), "config.json: num_hidden_layers must"),
        (json.dumps([LLAMA]), "config.json: expected a JSON object, got list"),
        ("{not json", "config.json: not valid JSON"),
        (b"\xff\xfe\x00garbage", "config.json: not valid JSON"),
    ],
)
def test_bad_config_json_names_the_file(tmp_path, content, match):
    p = tmp_path / "config.json"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError, match=re.escape(f"{p}")) as e:
        ModelConfig.from_dir(tmp_path)
    assert match in str(e.value)
