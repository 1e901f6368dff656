"""Tiny random Hugging Face checkpoints of every supported family, shared by all tests."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 384
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
    "llama_yarn": (
        "LlamaConfig",
        {
            **BASE,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "qwen2": ("Qwen2Config", {**BASE, "tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {**BASE, "head_dim": 32, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {**BASE, "sliding_window": 8}),
    "mixtral": ("MixtralConfig", {**BASE, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": (  # layer 1 dense (mlp_only_layers), top-2 of 8 without renormalization
        "Qwen3MoeConfig",
        {
            **BASE,
            "head_dim": 32,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "norm_topk_prob": False,
            "mlp_only_layers": [1],
        },
    ),
    "qwen3_moe_norm": (
        "Qwen3MoeConfig",
        {
            **BASE,
            "num_experts": 4,
            "num_experts_per_tok": 3,
            "moe_intermediate_size": 48,
            "norm_topk_prob": True,
            "tie_word_embeddings": True,
        },
    ),
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


# Families outside FAMILIES (which every engine test runs): dynamic NTK matches transformers
# only in token-by-token generation from a prompt within the original context
# (kiln.model.rope_scaling), here 24 tokens; the context is 2 x 24.
EXTRA_FAMILIES: dict[str, tuple[str, dict]] = {
    "llama_dynamic_rope": (
        "LlamaConfig",
        {
            **BASE,
            "max_position_embeddings": 24,
            "rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
        },
    ),
}


# State-space families (kiln.model.ssm), apart from FAMILIES: the engine features every
# attention family runs under (speculative decoding, prefix caching) do not apply to them.
SSM_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
SSM_FAMILIES: dict[str, tuple[str, dict]] = {
    "mamba": ("MambaConfig", {**SSM_BASE, "state_size": 8, "tie_word_embeddings": False}),
    "mamba2": (
        "Mamba2Config",
        {
            **SSM_BASE,
            "state_size": 16,
            "num_heads": 8,
            "head_dim": 16,
            "n_groups": 2,
            "chunk_size": 8,
        },
    ),
}


def build_hf_model(name: str, seed: int = 0):
    """A transformers model of family `name` with every weight (biases, norms too) random."""
    import transformers

    cls_name, kwargs = {**FAMILIES, **EXTRA_FAMILIES, **SSM_FAMILIES}[name]
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


# ids 0..4; the tiny models' config says bos=1, eos=2
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def save_chat_tokenizer(out: Path, vocab_size: int = VOCAB, all_bytes: bool = False) -> None:
    """A byte-level BPE of exactly `vocab_size` tokens with a ChatML template, saved to `out`.

    Every id the tiny model can sample decodes to text (which text comparisons need);
    characters the BPE never saw are dropped when encoding, unless `all_bytes` (every byte a
    token: what grammars need to spell digits, braces, ...)."""
    from chat_tokenizer import CHATML
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = (Path(__file__).resolve().parents[1] / "data/shakespeare/hamlet_gut.txt").read_text()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if all_bytes else []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=alphabet,
    )  # fmt: skip
    tok.train_from_iterator([text[:8000]], trainer)
    assert tok.get_vocab_size() == vocab_size
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", chat_template=CHATML
    ).save_pretrained(out)


def save_peft_adapter(hf, out: Path, r: int, alpha: float, targets: list[str], seed: int = 0):
    """A PEFT LoRA adapter on `hf` with random (not zero) weights, saved in `out` (PEFT's
    format, as kiln's fine-tuning writes it); returns the merged transformers model."""
    import copy

    import peft

    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(hf), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(out)
    return model.merge_and_unload()


def save_permutation_model(src: Path, out: Path, steps: int = 200) -> Path:
    """The model in src (a tiny one of VOCAB tokens) trained, a second on the CPU, to follow a
    fixed token permutation, saved to out with src's tokenizer: its greedy choices are decisive
    as a real model's are, not coin flips of a random one."""
    import shutil

    import torch.nn.functional as F

    from kiln.model.loader import load_model, save_model

    model = load_model(src, device="cpu").requires_grad_(True)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(vocab, generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        seq = [torch.randint(0, vocab, (16, 1), generator=gen)]
        for _ in range(32):
            seq.append(perm[seq[-1]])
        seq = torch.cat(seq, 1)
        loss = F.cross_entropy(model(seq[:, :-1]).flatten(0, 1), seq[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    save_model(model.eval().requires_grad_(False), out)
    for f in Path(src).iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, out / f.name)
    return out
