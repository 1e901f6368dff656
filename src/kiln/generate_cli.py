"""`kiln generate`: the reference loop (kiln.generate) on a model directory, streamed to stdout.

Apart from kiln.generate so that registering the verb imports no torch (`kiln --help` stays quick).
"""

from __future__ import annotations

import argparse

from kiln.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a model directory (reference loop)")
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--lora", default=None, help="PEFT-format adapter directory")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None)
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> None:
    import sys
    from pathlib import Path

    import torch

    from kiln.generate import generate_stream, validate_sampling
    from kiln.model.loader import load_model
    from kiln.tokenizer.hf import load_tokenizer

    if not args.prompt:
        raise InputError("empty prompt: --prompt needs some text")
    if args.max_tokens < 1:
        raise InputError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    validate_sampling(args.temperature, args.top_k, args.top_p)
    # A fine-tuned adapter directory may carry its own tokenizer (with the chat template the
    # adapter was trained on): prefer it, as PEFT users expect.
    with_tokenizer = args.lora and (Path(args.lora) / "tokenizer.json").is_file()
    tok = load_tokenizer(args.lora if with_tokenizer else args.model)
    model = load_model(args.model, dtype=args.dtype, device=args.device, lora=args.lora)
    if args.chat:
        messages = [{"role": "user", "content": args.prompt}]
        ids = tok.apply_chat_template(messages, tokenize=True)
    else:
        ids = tok.encode(args.prompt)
    if not ids:
        raise InputError("the prompt encodes to no tokens")
    device = next(model.parameters()).device
    prompt = torch.tensor([ids], device=device)
    stream = generate_stream(
        model,
        prompt,
        args.max_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        args.seed,
        tok.eos_token_ids,
    )
    out: list[int] = []
    printed = ""
    sys.stdout.write(args.prompt)
    for nxt in stream:
        tid = int(nxt[0])
        if tid in tok.eos_token_ids:
            break
        out.append(tid)
        text = tok.decode(out)
        if not text.endswith("\ufffd"):  # hold back half a multi-byte character
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text
    sys.stdout.write(tok.decode(out)[len(printed) :] + "\n")
