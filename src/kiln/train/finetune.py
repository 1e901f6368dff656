"""What `kiln sft` and `kiln dpo` share: flags, model preparation (full or LoRA), the run, export.

Full fine-tuning keeps float32 master weights (bfloat16 autocast on CUDA, in the shared loop)
and exports an HF directory in the checkpoint's dtype; LoRA freezes the base in its checkpoint
dtype, trains float32 adapters and exports a PEFT adapter directory. The tokenizer is saved
beside either, so `kiln generate --model DIR [--lora ADAPTER]` runs on the result.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kiln.config import LoraConfig
from kiln.errors import InputError
from kiln.flags import add_flags, flags_given
from kiln.train.config import FinetuneConfig
from kiln.train.default_model import built_chat_model

# For tokenizers without one (e.g. the bundled character-level model): plain-text turns that
# any vocabulary can spell, each assistant turn closed by the EOS token.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if not loop.first %}{{ '\n\n' }}{% endif %}"
    "{{ message['role'] | capitalize + ': ' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\nAssistant: ' if messages else 'Assistant: ' }}"
    "{% endif %}"
)


def add_finetune_arguments(p: argparse.ArgumentParser, default_data: str) -> None:
    """The flags every fine-tuning verb takes: model, data, output, LoRA, and FinetuneConfig's."""
    p.add_argument(
        "--model", default=None, help="HF model directory (default: the bundled default model)"
    )
    p.add_argument("--data", default=default_data, help=f"JSONL file (default {default_data})")
    p.add_argument("--out", required=True, help="output directory (HF model or PEFT adapter)")
    add_lora_arguments(p)
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="tokens per example (cut); default min(512, the model's context)",
    )
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    add_flags(p, FinetuneConfig, "training")


def train_config(args: argparse.Namespace) -> FinetuneConfig:
    """The run's TrainConfig: the flags given over FinetuneConfig's defaults, the rest derived."""
    cfg = FinetuneConfig(**flags_given(FinetuneConfig, args))
    return cfg.resolve(args.out, lora=lora_config_from_args(args) is not None)


def prepare(args: argparse.Namespace, device: str):
    """Load tokenizer and model onto `device`, then make LoRA adapters or every weight
    trainable."""
    import torch

    from kiln.model.loader import load_model
    from kiln.model.lora import apply_lora
    from kiln.tokenizer.hf import load_tokenizer
    from kiln.train.distributed import resolve_device

    if args.max_seq_len is not None and args.max_seq_len < 2:
        raise InputError(f"--max-seq-len must be >= 2, got {args.max_seq_len}")
    if args.model is None:
        args.model = str(built_chat_model())
    tok = load_tokenizer(args.model)
    if not tok.chat_template:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    lora = lora_config_from_args(args)
    model = load_model(
        args.model, dtype=None if lora else torch.float32, device=resolve_device(device)
    )
    context = model.config.max_position_embeddings
    if args.max_seq_len is None:
        args.max_seq_len = min(512, context)
    elif args.max_seq_len > context:
        raise InputError(
            f"--max-seq-len {args.max_seq_len} exceeds the model's context of {context} tokens"
        )
    if lora is not None:
        apply_lora(model, lora)
    else:
        model.requires_grad_(True)
    return model, tok


def run_training(model, tok, args, cfg, train_batch, loss_fn, val_batch=None) -> dict:
    """Run the shared loop with `cfg` (train_config), then export the result to OUT."""
    from kiln.train.distributed import init
    from kiln.train.loop import train

    lora = lora_config_from_args(args) is not None
    result = train(model, cfg, train_batch, loss_fn, val_batch, resume=args.resume)
    if init(cfg.device).is_main:
        export(model, tok, args.out, args.model, lora)
    summary = {k: v for k, v in result.items() if isinstance(v, float)}
    print(f"saved {'LoRA adapter' if lora else 'model'} to {args.out}: {summary}")
    return result


def export(model, tok, out: str, base: str, lora: bool) -> Path:
    """A PEFT adapter directory (LoRA) or an HF model directory in the base's dtype (full).

    The tokenizer goes first: the model's config.json, written last, marks a complete export.
    """
    from kiln.model.loader import save_model
    from kiln.model.lora import save_adapter

    tok.save(out)
    if lora:
        save_adapter(model, out, base_model_name_or_path=str(base))
    else:
        dtype = model.config.dtype
        if dtype in ("bfloat16", "float16"):
            import torch

            model.to(getattr(torch, dtype))
        save_model(model, out)
    return Path(out)


def add_lora_arguments(p: argparse.ArgumentParser) -> None:
    """LoraConfig's flags (--lora-r, --lora-alpha, ...); without --lora-r, a full fine-tune."""
    add_flags(p, LoraConfig, "LoRA (give --lora-r for LoRA; without it, a full fine-tune)")


def lora_config_from_args(args: argparse.Namespace) -> LoraConfig | None:
    """The LoraConfig the CLI flags ask for, or None for full fine-tuning."""
    given = flags_given(LoraConfig, args)
    if "r" not in given:
        if given:
            raise InputError(f"--{next(iter(given)).replace('_', '-')} needs --lora-r")
        return None
    return LoraConfig(**given)
