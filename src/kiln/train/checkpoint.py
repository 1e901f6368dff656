"""Training checkpoints: one safetensors file holding trainable weights, optimizer state, RNG.

    model.<name>             trainable parameters only (a LoRA run stores just its adapters)
    optim.<name>.<key>       AdamW's exp_avg / exp_avg_sq / step per parameter
    rng.<rank>.cpu|cuda      each rank's generator state (dropout draws resume exactly)
    metadata                 step, optimizer param_groups and caller extras, as JSON strings

The file is written to a temp name (`<name>.tmp<pid>`), fsynced, then os.replace()d over the old
one, so a run killed mid-write leaves the previous checkpoint intact; the next run removes the
temp file such a kill leaves behind. Nothing is ever unpickled.
"""

from __future__ import annotations

import glob
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from kiln.errors import CheckpointError

CHECKPOINT_NAME = "checkpoint.safetensors"


def trainable_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """name -> shape of each trainable parameter (tied parameters once, under their first name)."""
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint atomically. Collective under torch.distributed: call on every rank."""
    path = Path(path)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    rng = _gather_rng()
    if dist.is_initialized() and dist.get_rank() != 0:
        dist.barrier()
        return
    tensors = {f"model.{n}": model_sd[n] for n in trainable_shapes(model)}
    for name, state in optim_sd["state"].items():
        for key, value in state.items():
            tensors[f"optim.{name}.{key}"] = torch.as_tensor(value)
    for rank, (cpu, cuda) in enumerate(rng):
        tensors[f"rng.{rank}.cpu"] = cpu
        if cuda is not None:
            tensors[f"rng.{rank}.cuda"] = cuda
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {
        "step": str(step),
        "param_groups": json.dumps(optim_sd["param_groups"]),
        "extra": json.dumps(extra or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path, os.getpid())
    try:
        save_file(tensors, str(tmp), metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if dist.is_initialized():
        dist.barrier()


def _temp_path(path: Path, pid: int | str) -> Path:
    return path.with_name(f"{path.name}.tmp{pid}")


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temp files of writes to checkpoint `path` that were killed (kill -9, OOM).

    A temp file names its writer's pid: one whose process still runs (another run sharing the
    directory) is kept; this process writes nothing while it calls this, so its own pid's file
    is stale too (left by an earlier process given the same pid). Returns the files removed.
    """
    path = Path(path)
    prefix = _temp_path(path, "").name
    removed = []
    for tmp in path.parent.glob(f"{glob.escape(prefix)}*"):
        pid = tmp.name.removeprefix(prefix)
        if re.fullmatch(r"[0-9]+", pid) and not _is_other_live_process(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _is_other_live_process(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a checkpoint file; CheckpointError if missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        int(metadata["step"])
        json.loads(metadata["param_groups"])
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or not a kiln checkpoint: {e}"
        ) from None
    return tensors, metadata


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[int, dict[str, Any]]:
    """Restore weights, optimizer and this rank's RNG; returns (step, extra)."""
    tensors, metadata = read_checkpoint(path)
    model_sd = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    _check_shapes(path, model_sd, trainable_shapes(model))
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            name, _, field = key[len("optim.") :].rpartition(".")
            state.setdefault(name, {})[field] = value
    groups = json.loads(metadata["param_groups"])
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_sd,
        optim_state_dict={"state": state, "param_groups": groups},
        options=opts,
    )
    rank = dist.get_rank() if dist.is_initialized() else 0
    if f"rng.{rank}.cpu" in tensors:
        torch.set_rng_state(tensors[f"rng.{rank}.cpu"])
    if f"rng.{rank}.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[f"rng.{rank}.cuda"])
    return int(metadata["step"]), json.loads(metadata.get("extra", "{}"))


def _check_shapes(path, saved: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]):
    where = f"checkpoint {str(path)!r}"
    for name, shape in expected.items():
        if name not in saved:
            raise CheckpointError(
                f"{where} lacks parameter {name!r}: was it saved by another model?"
            )
        if tuple(saved[name].shape) != shape:
            raise CheckpointError(
                f"{where}: {name!r} has shape {tuple(saved[name].shape)}, the model has {shape} "
                "(a checkpoint of another model shape)"
            )
    extra = sorted(set(saved) - set(expected))
    if extra:
        raise CheckpointError(f"{where} holds {extra[0]!r}, which this model does not train")


def _gather_rng() -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Every rank's (cpu, cuda) generator state, in rank order."""
    mine = (
        torch.get_rng_state(),
        torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    )
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [mine]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states
