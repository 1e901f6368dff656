"""`kiln tokenizer train|encode`: train kiln's byte-level BPE, or encode text with one."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `tokenizer` verb and its `train` and `encode` sub-verbs."""
    parser = subparsers.add_parser("tokenizer", help="train or apply a byte-level BPE tokenizer")
    sub = parser.add_subparsers(dest="tokenizer_command", required=True, metavar="SUBCOMMAND")

    train = sub.add_parser("train", help="learn a BPE vocabulary from text files")
    train.add_argument("--input", nargs="+", required=True, type=Path, metavar="PATH")
    train.add_argument("--vocab-size", type=int, required=True, metavar="N")
    train.add_argument("--pattern", default="gpt2", help="pre-tokenization regex: gpt2 or gpt4")
    train.add_argument(
        "--special",
        nargs="*",
        default=["<|endoftext|>"],
        metavar="TOKEN",
        help="special tokens, never merged (default: <|endoftext|>)",
    )
    train.add_argument("--out", required=True, type=Path, metavar="DIR")
    train.set_defaults(func=_train)

    encode = sub.add_parser("encode", help="print the token ids of a text")
    encode.add_argument("--tokenizer", required=True, type=Path, metavar="DIR")
    encode.add_argument("--text", required=True)
    encode.set_defaults(func=_encode)


def _train(args: argparse.Namespace) -> None:
    from kiln.tokenizer.bpe import BPETokenizer

    tok = BPETokenizer.train(args.input, args.vocab_size, args.pattern, args.special)
    tok.save(args.out)
    print(f"saved {tok.n_vocab} tokens ({len(tok.merges)} merges) to {args.out}")


def _encode(args: argparse.Namespace) -> None:
    from kiln.tokenizer.bpe import BPETokenizer

    print(json.dumps(BPETokenizer.load(args.tokenizer).encode(args.text)))
