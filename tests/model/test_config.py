"""ModelConfig mapping of Hugging Face config fields."""

from kiln.config import ModelConfig


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
