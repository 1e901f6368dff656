"""Triton where it is installed; without it (macOS, Windows) only the torch references run."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

    def _jit(fn=None, **kwargs):
        return fn if fn is not None else (lambda f: f)

    # Just enough for the kernel definitions to import; their dispatchers never launch them.
    triton = SimpleNamespace(jit=_jit)
    tl = SimpleNamespace(constexpr=None)


def use_triton(x: torch.Tensor) -> bool:
    """True where the dispatching functions should launch the Triton kernel."""
    return HAS_TRITON and x.is_cuda


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a fixed guess for the CPU interpreter)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def assert_head_dim(head_dim: int) -> None:
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, (
        f"head_dim must be a power of two >= 16, got {head_dim}"
    )
