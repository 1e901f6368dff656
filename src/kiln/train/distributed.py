"""torch.distributed plumbing for the training loop: process group, device, DDP / FSDP wrapping.

Launch with `torchrun --nproc_per_node N -m kiln.cli pretrain ...`: torchrun sets RANK,
WORLD_SIZE and LOCAL_RANK, and `init` joins the group (nccl on CUDA, gloo on CPU).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def init(device: str = "auto") -> DistInfo:
    """Join the process group when launched with WORLD_SIZE > 1 (idempotent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(rank, local_rank, world, dev)


def wrap(model: nn.Module, info: DistInfo, fsdp: bool) -> nn.Module:
    """The model the loop runs forward/backward through: DDP, FSDP (in place), or itself."""
    if info.world_size == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in getattr(model, "layers", []):
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def no_sync(wrapped: nn.Module, sync: bool):
    """Skip the gradient all-reduce on micro-steps that are not the last of a step."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(wrapped, "no_sync"):  # DDP
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def fsdp_no_sync():
            wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                wrapped.set_requires_gradient_sync(True)

        return fsdp_no_sync()
    return contextlib.nullcontext()


def mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """Average a tensor over all ranks (identity in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
