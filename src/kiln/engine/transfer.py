"""Host <-> device copies that never stall the host behind queued GPU work.

A copy from pageable memory waits for the stream to drain; through pinned memory it is queued
like a kernel (the caching host allocator keeps the pinned block alive until the copy ran).
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list or array as a device tensor, copied behind the queued GPU work."""
    if isinstance(values, np.ndarray):
        t = torch.from_numpy(values).to(dtype)
    else:
        t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def copy_to_device(dst: torch.Tensor, values: np.ndarray) -> None:
    """Copy a host array (of dst's dtype and size) into the device tensor dst, behind the
    queued GPU work."""
    src = torch.from_numpy(values).view(dst.shape)
    if dst.is_cuda:
        src = src.pin_memory()
    dst.copy_(src, non_blocking=True)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """Start copying a device tensor to pinned host memory behind the queued GPU work (read it
    after an event recorded later has completed)."""
    if not t.is_cuda:
        return t.clone()  # a copy all the same: t may be a buffer the next step overwrites
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)
