"""`kiln <verb>`: the one command-line entry point.

Each verb lives beside the code it drives: a module named in COMMANDS exposes
`register(subparsers)`, which adds its parser and sets `func(args) -> int | None`. Only the
module of the verb being run is imported, so `kiln --help` and a light verb stay quick.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kiln.errors import KilnError

# verb -> (module that registers it, its one-line help). `kiln --help` lists verbs from this
# table and `kiln VERB ...` imports only VERB's module, so neither pays for torch unless the verb
# needs it; tests/test_flags.py checks the table against what each module registers.
COMMANDS = {
    "generate": ("kiln.generate_cli", "generate text from a model directory (reference loop)"),
    "serve": ("kiln.serve.cli", "serve a model over an OpenAI-compatible HTTP API"),
    "pretrain": ("kiln.train.pretrain", "pretrain a model from a TOML config"),
    "sft": ("kiln.train.sft", "supervised fine-tuning on chat JSONL (full or LoRA)"),
    "dpo": ("kiln.train.dpo", "direct preference optimization on preference JSONL"),
    "kto": ("kiln.train.kto", "KTO on unpaired desirable / undesirable completions"),
    "reward": ("kiln.train.reward", "train a reward model on preference JSONL (Bradley-Terry)"),
    "grpo": ("kiln.train.grpo", "GRPO: group-relative policy optimization with a reward"),
    "ppo": ("kiln.train.ppo", "PPO with a value head against a reward model or function"),
    "rft": ("kiln.train.rft", "rejection-sampling fine-tuning: best-of-n by reward, SFT"),
    "demo": ("kiln.demo", "build the default model if needed, sample, serve it"),
    "tokenizer": ("kiln.tokenizer.cli", "train or apply a byte-level BPE tokenizer"),
    "bench": ("kiln.eval.bench", "throughput benchmarks (offline engine, serving)"),
    "profile": (
        "kiln.engine.profile",
        "profile engine steps with the torch profiler (Chrome trace + top kernels)",
    ),
    "eval": (
        "kiln.eval.cli",
        "evaluate a model: perplexity, multiple choice, generation, LLM-as-judge",
    ),
    "quantize": ("kiln.quant.cli", "quantize a model (RTN, GPTQ, AWQ, SmoothQuant, FP8)"),
    "prune": ("kiln.compress.cli", "prune weights, heads or MLP channels"),
    "distill": ("kiln.compress.cli", "distill a teacher into a smaller student"),
    "qat": ("kiln.compress.cli", "quantization-aware training, exported as kiln quantize"),
    "train-draft": (
        "kiln.train_draft",
        "train a Medusa / EAGLE / early-exit draft for speculative decoding",
    ),
    "rag": ("kiln.apps.cli", "retrieval-augmented generation over documents"),
    "sql": ("kiln.apps.cli", "text-to-SQL over a SQLite database (read-only)"),
    "agent": ("kiln.apps.cli", "a tool-calling agent (calculator, RAG search)"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; given argv, only the module of argv's verb is imported (the other verbs
    are listed by name and help)."""
    parser = argparse.ArgumentParser(prog="kiln", description="kiln: an LLM's whole life.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    verb = next((a for a in argv if not a.startswith("-")), None) if argv is not None else None
    chosen = {COMMANDS[verb][0]} if verb in COMMANDS else set()
    if argv is None:
        chosen = {module for module, _ in COMMANDS.values()}
    registered: set[str] = set()
    for name, (module, help_) in COMMANDS.items():
        if module not in chosen:
            sub.add_parser(name, help=help_)
        elif module not in registered:
            importlib.import_module(module).register(sub)
            registered.add(module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return args.func(args) or 0
    except KilnError as e:
        print(f"kiln {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
