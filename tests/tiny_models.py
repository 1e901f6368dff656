"""Tiny random Hugging Face checkpoints of every supported family, shared by all tests."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 256
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
)

# name -> (transformers config class name, config kwargs)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(BASE)),
    "llama_mqa": ("LlamaConfig", {**BASE, "num_key_value_heads": 1, "attention_bias": True}),
    "llama_mha_tied": (
        "LlamaConfig",
        {**BASE, "num_key_value_heads": 4, "tie_word_embeddings": True},
    ),
    "llama3_rope": (
        "LlamaConfig",
        {
            **BASE,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
    ),
    "llama_linear_rope": (
        "LlamaConfig",
        {**BASE, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    ),
    "qwen2": ("Qwen2Config", {**BASE, "tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {**BASE, "head_dim": 32, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {**BASE, "sliding_window": 8}),
    "mixtral": ("MixtralConfig", {**BASE, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "gpt2": (
        "GPT2Config",
        dict(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=256,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
}


def build_hf_model(name: str, seed: int = 0):
    """A transformers model of family `name` with every weight (biases, norms too) random."""
    import transformers

    cls_name, kwargs = FAMILIES[name]
    config = getattr(transformers, cls_name)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or "ln_" in pname:
                p.copy_(
                    1.0 + 0.1 * torch.randn_like(p)
                    if pname.endswith("weight")
                    else 0.1 * torch.randn_like(p)
                )
            else:
                p.normal_(0.0, 0.08)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def save_hf_model(name: str, out: Path, max_shard_size: str | None = None, seed: int = 0):
    """Save a tiny random `name` model (and return the transformers model)."""
    model = build_hf_model(name, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return model
