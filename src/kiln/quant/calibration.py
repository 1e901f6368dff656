"""Calibration inputs for GPTQ: token windows cut from a text file, or from the bundled corpus."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kiln.errors import InputError
from kiln.train.default_model import CORPUS


def calibration_ids(
    tokenizer, calib: str | os.PathLike | None, samples: int, length: int
) -> torch.Tensor:
    """`samples` consecutive windows of `length` tokens [samples, length] from `calib` (a text
    file; default: the bundled Shakespeare corpus); InputError if the text is too short."""
    if samples < 1 or length < 1:
        raise InputError(
            f"--calib-samples {samples} and --calib-len {length} must be >= 1", param="calib"
        )
    if calib is not None and not Path(calib).is_file():
        raise InputError(f"--calib {str(calib)!r} is not a file", param="calib")
    files = [Path(calib)] if calib is not None else sorted(CORPUS.glob("*.txt"))
    need = samples * length
    ids: list[int] = []
    for f in files:
        ids += tokenizer.encode(f.read_text(encoding="utf-8"), add_special_tokens=False)
        if len(ids) >= need:
            break
    if len(ids) < need:
        where = str(calib) if calib is not None else "the bundled corpus"
        raise InputError(
            f"calibration text {where} gives {len(ids)} tokens; --calib-samples {samples} x "
            f"--calib-len {length} needs {need}",
            param="calib",
        )
    return torch.tensor(ids[:need]).view(samples, length)
