"""`kiln eval <ppl>`: evaluate a model directory (perplexity over a text file)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model (perplexity)")
    verbs = p.add_subparsers(dest="eval_command", required=True, metavar="KIND")
    ppl = verbs.add_parser("ppl", help="perplexity over a text file (sliding window)")
    ppl.add_argument("--model", required=True, help="Hugging Face model directory")
    ppl.add_argument("--text", required=True, help="UTF-8 text file to score")
    ppl.add_argument(
        "--max-len", type=int, default=None, help="window length (default min(1024, context))"
    )
    ppl.add_argument(
        "--stride", type=int, default=None, help="window step (default min(512, max_len // 2))"
    )
    ppl.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ppl.add_argument("--device", default=None)
    ppl.add_argument("--json", default=None, metavar="FILE", help="write the result as JSON")
    ppl.set_defaults(func=_ppl_cli)


def _ppl_cli(args: argparse.Namespace) -> None:
    from kiln.config import ModelConfig
    from kiln.errors import InputError
    from kiln.eval.ppl import check_window, default_stride, perplexity
    from kiln.model.loader import load_model
    from kiln.tokenizer.hf import load_tokenizer

    text_file = Path(args.text)
    if not text_file.is_file():
        raise InputError(f"--text {args.text!r}: no such file")
    text = text_file.read_text(encoding="utf-8")
    if not text.strip():
        raise InputError(f"--text {args.text!r} is empty")
    # Check the window against the model's context before loading any weights.
    context = ModelConfig.from_dir(Path(args.model)).max_position_embeddings
    max_len = min(1024, context) if args.max_len is None else args.max_len
    stride = default_stride(max_len) if args.stride is None else args.stride
    check_window(max_len, stride, context)
    ids = load_tokenizer(args.model).encode(text)
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    r = perplexity(model, ids, max_len=max_len, stride=stride)
    print(f"perplexity {r['perplexity']:.4f} over {r['tokens']} tokens")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"perplexity": r["perplexity"], "tokens": r["tokens"]}) + "\n"
        )
