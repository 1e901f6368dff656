"""Write a quantized model as a Hugging Face GPTQ, AWQ or compressed-tensors directory,
atomically: everything goes into a hidden folder beside the output, renamed into place only once
complete."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from kiln.model.hf_format import kiln_to_hf
from kiln.model.loader import DTYPES
from kiln.model.transformer import Transformer

SKIP_FILES = ("config.json", "model.safetensors.index.json")


Pack = Callable[[Any], dict[str, torch.Tensor]]  # IntWeight / W8A8Weight -> its tensors


def quantized_state(
    model: Transformer, weights: dict[str, Any], dtype: torch.dtype, pack: Pack
) -> dict[str, torch.Tensor]:
    """HF-named tensors: `<prefix>.<part>` for each part pack() gives a quantized Linear (kiln
    name `prefix` in `weights`), every other tensor as is in `dtype`."""
    config = model.config
    plain = {
        k: v.detach().to(dtype).contiguous()
        for k, v in model.state_dict().items()
        if k.removesuffix(".weight") not in weights
    }
    out = kiln_to_hf(config, plain)
    for name, w in weights.items():
        (hf_name,) = kiln_to_hf(config, {f"{name}.weight": torch.empty(0)})
        prefix = hf_name.removesuffix(".weight")
        out |= {f"{prefix}.{part}": t for part, t in pack(w).items()}
    return out


def _cpu(w):
    """A copy of the quantized weight w (a dataclass of tensors) with its tensors on the CPU."""
    tensors = {f.name: getattr(w, f.name) for f in dataclasses.fields(w)}
    return dataclasses.replace(w, **{k: v.cpu() for k, v in tensors.items() if torch.is_tensor(v)})


def copy_side_files(src_dir: Path, out_dir: Path) -> None:
    """Copy a model directory's files but its weights and config (the tokenizer, generation
    config, ...) into out_dir."""
    for f in Path(src_dir).iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in SKIP_FILES:
            shutil.copy2(f, Path(out_dir) / f.name)


def write_atomic(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """Run write(tmp) on a fresh folder beside out_dir, then rename it to out_dir; on any
    exception (Ctrl-C too) the folder is removed and nothing is left at out_dir."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def save_quantized(
    model: Transformer,
    weights: dict[str, Any],
    quantization_config: dict,
    src_dir: Path,
    out_dir: Path,
    pack: Pack,
) -> Path:
    """Write config.json (with `quantization_config`), model.safetensors and the source
    directory's other files (tokenizer, generation config) to out_dir, atomically; pack turns
    each quantized weight into the format's tensors (pack_gptq, pack_awq, pack_w8a8)."""
    config = model.config
    dtype = DTYPES.get(config.dtype or "float32", torch.float32)
    model.cpu()  # calibration may have run on an accelerator
    weights = {name: _cpu(w) for name, w in weights.items()}

    def write(tmp: Path) -> None:
        copy_side_files(src_dir, tmp)
        state = quantized_state(model, weights, dtype, pack)
        save_file(state, str(tmp / "model.safetensors"), {"format": "pt"})
        hf = config.to_hf() | {"quantization_config": quantization_config}
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")

    return write_atomic(out_dir, write)
