"""`kiln prune`, `kiln distill`, `kiln qat`: make a model smaller or cheaper.

    kiln prune --model DIR --out DIR --method magnitude|wanda|sparsegpt --sparsity 0.5
    kiln prune --model DIR --out DIR --method sparsegpt --pattern 2:4
    kiln prune --model DIR --out DIR --method heads|channels --sparsity 0.25 [--recover-steps 100]
    kiln distill --teacher DIR --student DIR|CONFIG.json|'{"num_hidden_layers": 2}' --out DIR
    kiln qat --model DIR --out DIR --bits 4 --group-size 128 [--max-steps 200]

Flags come from the dataclasses of kiln.compress.config (and FinetuneConfig's for the training
knobs, kiln.flags), so a default lives only there.
"""

from __future__ import annotations

import argparse

from kiln.compress.config import DistillConfig, PruneConfig, QATConfig, TextData
from kiln.flags import add_flags, flags_given
from kiln.train.config import FinetuneConfig


def _training_flags(p: argparse.ArgumentParser, title: str, skip: tuple[str, ...] = ()) -> None:
    add_flags(p, TextData, "training text")
    add_flags(p, FinetuneConfig, title, skip=("pipeline_parallel", "pipeline_schedule", *skip))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `prune`, `distill` and `qat` verbs."""
    p = subparsers.add_parser("prune", help="prune weights, heads or MLP channels")
    p.add_argument("--model", required=True, metavar="DIR", help="Hugging Face model directory")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist)")
    add_flags(p, PruneConfig, "pruning")
    _training_flags(p, "recovery fine-tune (--device: where calibration runs too)", ("max_steps",))
    p.set_defaults(func=_prune)

    p = subparsers.add_parser("distill", help="distill a teacher into a smaller student")
    p.add_argument("--teacher", required=True, metavar="DIR", help="the teacher model directory")
    p.add_argument(
        "--student",
        required=True,
        metavar="DIR|CONFIG",
        help="a model directory (its weights), or a config (a JSON file or inline JSON whose "
        "fields override the teacher's config.json: a fresh student)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist)")
    add_flags(p, DistillConfig, "distillation")
    _training_flags(p, "training")
    p.set_defaults(func=_distill)

    p = subparsers.add_parser("qat", help="quantization-aware training, exported as kiln quantize")
    p.add_argument("--model", required=True, metavar="DIR", help="Hugging Face model directory")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist)")
    add_flags(p, QATConfig, "quantization")
    _training_flags(p, "training")
    p.set_defaults(func=_qat)


def _configs(args: argparse.Namespace, *classes) -> list:
    return [cls(**flags_given(cls, args)) for cls in classes]


def _prune(args: argparse.Namespace) -> None:
    from kiln.compress.prune import prune

    cfg, data, train = _configs(args, PruneConfig, TextData, FinetuneConfig)
    print(f"wrote {prune(args.model, args.out, cfg, train, data, progress=True)}")


def _distill(args: argparse.Namespace) -> None:
    from kiln.compress.distill import distill

    cfg, data, train = _configs(args, DistillConfig, TextData, FinetuneConfig)
    result = distill(args.teacher, args.student, args.out, cfg, train, data)
    print(f"wrote {args.out}: {_summary(result)}")


def _qat(args: argparse.Namespace) -> None:
    from kiln.compress.qat import qat

    scheme, data, train = _configs(args, QATConfig, TextData, FinetuneConfig)
    result = qat(args.model, args.out, scheme, train, data)
    print(f"wrote {result.get('export')}: {_summary(result)}")


def _summary(result: dict) -> dict:
    return {k: round(v, 4) for k, v in result.items() if isinstance(v, float)}
