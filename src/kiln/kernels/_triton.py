"""Triton where it is installed; without it (macOS, Windows) only the torch references run."""

from __future__ import annotations

import functools
import os
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

try:  # grid dependency control (programmatic dependent launch), Hopper and later
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:

    @triton.jit
    def gdc_launch_dependents():
        pass

    @triton.jit
    def gdc_wait():
        pass


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


@functools.cache
def _pdl_capable(device: torch.device) -> bool:
    if not HAS_TRITON or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    fields = getattr(CUDAOptions, "__dataclass_fields__", {})
    return "launch_pdl" in fields and torch.cuda.get_device_capability(device)[0] >= 9


# Programmatic dependent launch for the decode kernels; KILN_PDL=0 switches it off.
PDL_ENABLED = os.environ.get("KILN_PDL", "1") != "0"


def use_pdl(x: torch.Tensor) -> bool:
    """Whether kernels on x's device may be launched with programmatic dependent launch (a
    kernel starts while the previous one drains; its `gdc_wait()` holds its dependent reads
    until the previous kernel's writes are visible)."""
    return PDL_ENABLED and x.is_cuda and _pdl_capable(x.device)


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """A kernel's first statement under programmatic dependent launch: let the next kernel
    launch now, and wait until the previous one's writes are visible (no-op when not PDL)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


def pdl_options(pdl: bool) -> dict:
    """Launch keyword arguments for a kernel launched with (or without) PDL."""
    return {"launch_pdl": True} if pdl else {}
