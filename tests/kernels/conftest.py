"""Kernel tests: Triton kernels against their torch references.

Without CUDA the kernels run in Triton's interpreter, which must be switched on before the
kernels are defined (`triton.jit` reads TRITON_INTERPRET when it decorates them).
"""

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Without Triton (macOS, Windows) there is nothing here to compare.
collect_ignore_glob = [] if importlib.util.find_spec("triton") else ["test_*.py"]


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Largest |triton - reference| allowed, relative to the reference's largest magnitude.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Max-abs error relative to the reference's scale, under the dtype's threshold."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.isfinite(actual).all(), "non-finite values in the kernel's output"
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().clamp_min(1e-6).item()
    assert err / scale <= TOLERANCE[expected.dtype], f"relative error {err / scale:.2e}"


def call_poisoned(fn, *args, **kwargs):
    """fn(*args, **kwargs) right after freeing NaN-filled memory as large as the inputs, so
    that (through the CUDA caching allocator) an output element the kernel forgets shows up."""
    numel = sum(a.numel() for a in args if isinstance(a, torch.Tensor))
    torch.full((numel,), float("nan"), device=DEVICE)
    return fn(*args, **kwargs)


def make_paged_kv(
    context_lens: list[int],
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str = DEVICE,
):
    """Random K/V caches with each sequence's blocks scattered in random order.

    Returns (k_cache, v_cache, block_tables [B, max_blocks] int32); the tables' unused tail
    holds -1, which a kernel must never follow.
    """
    needed = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(needed) + 3
    order = torch.randperm(num_blocks).int()
    tables = torch.full((len(context_lens), max(needed) + 1), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(needed):
        tables[b, :n] = order[used : used + n]
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=dtype, device=device)
    v_cache = torch.randn(shape, dtype=dtype, device=device)
    return k_cache, v_cache, tables.to(device)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=[torch.float32, torch.float16, torch.bfloat16], ids=str)
def dtype(request):
    """Every dtype the kernels support; a test may narrow it with its own parametrize."""
    return request.param


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def check():
    """check(triton_output, reference_output): the dtype's relative tolerance holds."""
    return assert_close


@pytest.fixture
def poisoned():
    """poisoned(fn, *args, **kwargs): call a kernel whose output lands in NaN-filled memory."""
    return call_poisoned


@pytest.fixture
def paged_kv():
    """paged_kv(context_lens, block_size, num_kv_heads, head_dim, dtype) -> k, v, tables."""
    return make_paged_kv
