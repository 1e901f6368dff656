"""8-bit activations for the W8A8 Linears: each row of x [M, K] scaled by its absmax / qmax (or
one static scale) onto the float8 e4m3 or int8 grid. The reference takes several passes over x
in float32; the kernel reads each row twice (absmax, then quantize) and writes one byte a value.
"""

from __future__ import annotations

import torch

from kiln.kernels._triton import tl, triton

FP8 = torch.float8_e4m3fn
MIN_SCALE = 1e-12  # an all-zero row gets this scale, not 0 (no 0 / 0)


def qmax(dtype: torch.dtype) -> float:
    """The largest magnitude a symmetric 8-bit grid holds: 448 (e4m3), 127 (int8)."""
    return torch.finfo(FP8).max if dtype == FP8 else 127.0


def to_8bit(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x / scale on the 8-bit grid of `dtype` (int8: rounded half to even; e4m3: its cast)."""
    m = qmax(dtype)
    y = (x.float() / scale).clamp(-m, m)
    return y.to(FP8) if dtype == FP8 else y.round().to(torch.int8)


def quantize_rows_ref(
    x: torch.Tensor, dtype: torch.dtype, static_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] as 8 bits and its scales [M, 1] float32: each row's absmax / qmax, or the one
    static scale [] for every row."""
    if static_scale is None:
        scale = x.abs().amax(-1, keepdim=True).float().div(qmax(dtype)).clamp(min=MIN_SCALE)
    else:
        scale = static_scale.reshape(1, 1).expand(x.shape[0], 1)
    return to_8bit(x, scale, dtype), scale


@triton.jit
def row_scale(amax, QMAX: tl.constexpr):
    """A row's scale from its absmax: amax / qmax, at least MIN_SCALE (quantize_rows_ref's)."""
    return tl.maximum(amax / QMAX, 1e-12)


@triton.jit
def quantize_block(x, scale, QMAX: tl.constexpr, IS_FP8: tl.constexpr):
    """x (float32) / scale on the 8-bit grid: to_8bit's steps (a correctly rounded division,
    the clamp, then the e4m3 cast or int8 rounding half to even). The quantization kernel and
    the fused W8A8 GEMM (kiln.kernels.w8a8_mm) both quantize with it, so their bytes agree."""
    y = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -QMAX), QMAX)
    if IS_FP8:
        q = y.to(tl.float8e4nv)
    else:  # round half to even, as torch.round
        f = tl.floor(y)
        d = y - f
        odd = f - 2.0 * tl.floor(f * 0.5)  # 1.0 where f is odd
        r = tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, f + odd))
        q = r.to(tl.int8)
    return q


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr, static_ptr, K, stride_x, stride_q,
    QMAX: tl.constexpr, IS_FP8: tl.constexpr, STATIC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    if STATIC:
        scale = tl.load(static_ptr).to(tl.float32)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            cols = k0 + tl.arange(0, BLOCK)
            x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = row_scale(tl.max(amax, axis=0), QMAX)
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        mask = cols < K
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * stride_q + cols, quantize_block(x, scale, QMAX, IS_FP8), mask=mask)


def quantize_rows_triton(
    x: torch.Tensor, dtype: torch.dtype, static_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton quantize_rows; same contract as quantize_rows_ref."""
    assert x.dim() == 2 and x.stride(-1) == 1
    m, k = x.shape
    q = torch.empty(m, k, dtype=dtype, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    static = static_scale is not None
    block = min(triton.next_power_of_2(k), 4096)
    _quantize_rows_kernel[(m,)](
        x, q, scale, static_scale if static else scale, k, x.stride(0), q.stride(0),
        QMAX=qmax(dtype), IS_FP8=dtype == FP8, STATIC=static, BLOCK=block,
    )  # fmt: skip
    return q, scale
