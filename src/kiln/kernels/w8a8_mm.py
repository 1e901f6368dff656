"""W8A8 GEMM in one Triton kernel: y = (x_q @ W_q^T) * x_scale * w_scale^T (+ bias), with
the 8-bit products accumulated on the tensor cores (int8 -> int32, e4m3 -> float32) and the
scales, the bias and the cast to the output dtype applied to the accumulator tile before it
leaves the registers. The contract is kiln.model.w8a8's w8a8_mm_reference, then `+ bias` in the
output dtype (the same two roundings), so int8 gives the reference's exact bytes wherever its
float32 matmul is exact (|accumulator| < 2^24).

Two entry points, one kernel:
- `w8a8_mm_triton(xq, x_scale, ...)`: x already quantized (kiln.kernels.quant_act), scales
  [M, 1]; for M past a few rows;
- `w8a8_linear_triton(x, ...)`: x in float; each program finds its rows' absmax (or takes the
  static scale) and quantizes its x tiles as it loads them (quant_act.quantize_block, the
  quantization kernel's steps), so decode's few rows cost one launch and write no x_q. Each
  program reads its rows of x twice (absmax, then the K loop): nothing at M <= 16, where the
  weight dominates, but N / BLOCK_N times x at large M, so the dispatcher uses it for small M.

`scale_epilogue_triton` is the same epilogue alone, for torch._int_mm's int32 output: one pass
instead of four elementwise kernels (float, * x_scale, * w_scale, to bf16) over [M, N].

W [N, K] is read K-major (row-major [N, K], the layout 8-bit wgmma and cuBLASLt's IMMA path
want), as the [BLOCK_K, BLOCK_N] tiles of W^T.
"""

from __future__ import annotations

import torch

from kiln.kernels._triton import tl, triton
from kiln.kernels.quant_act import FP8, qmax, quantize_block, row_scale

# The interpreter (CPU tests) uses small tiles, so that tiny shapes cross tile boundaries.
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)


@triton.jit
def _scale_store(
    acc, x_scale, offs_m, offs_n, ws_ptr, bias_ptr, out_ptr, M, N, stride_om,
    HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """The epilogue: acc [BM, BN] (int32 or float32) * x_scale [BM] * w_scale [BN] in float32,
    cast to the output dtype, then + bias (in float32, rounded again), stored masked."""
    n_ok = offs_n < N
    w_scale = tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0)
    y = (acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]).to(out_ptr.dtype.element_ty)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        y = (y.to(tl.float32) + bias[None, :]).to(out_ptr.dtype.element_ty)
    rows = offs_m.to(tl.int64)[:, None] * stride_om
    tl.store(out_ptr + rows + offs_n[None, :], y, mask=(offs_m < M)[:, None] & n_ok[None, :])


@triton.jit
def _w8a8_mm_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, static_ptr, out_ptr,
    M, N, K, stride_xm, stride_wn, stride_om,
    QUANT: tl.constexpr, STATIC: tl.constexpr, IS_FP8: tl.constexpr, QMAX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M, BLOCK_N] tile of y. QUANT: x is float and quantized here (per-row absmax,
    or the STATIC scale); else x is 8-bit with its scales at xs_ptr [M]."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row tiles share each column tile of W while it is in L2.
    in_group = GROUP_M * tiles_n
    first_m = (pid // in_group) * GROUP_M
    group_size = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
    if QUANT:
        if STATIC:
            x_scale = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(static_ptr).to(tl.float32)
        else:
            amax = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                x = tl.load(x_ptrs + k0, mask=m_ok[:, None] & (offs_k[None, :] < K - k0), other=0.0)
                amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
            x_scale = row_scale(amax, QMAX)
    else:
        x_scale = tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)
    if IS_FP8:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if QUANT:
            a = quantize_block(a.to(tl.float32), x_scale[:, None], QMAX, IS_FP8)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IS_FP8:
            acc = tl.dot(a, b, acc)
        else:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    _scale_store(acc, x_scale, offs_m, offs_n, ws_ptr, bias_ptr, out_ptr, M, N, stride_om, HAS_BIAS)


@triton.jit
def _scale_epilogue_kernel(
    acc_ptr, xs_ptr, ws_ptr, bias_ptr, out_ptr, M, N, stride_am, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    rows = offs_m.to(tl.int64)[:, None] * stride_am
    acc = tl.load(acc_ptr + rows + offs_n[None, :], mask=m_ok[:, None] & (offs_n < N)[None, :])
    x_scale = tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)
    _scale_store(acc, x_scale, offs_m, offs_n, ws_ptr, bias_ptr, out_ptr, M, N, stride_om, HAS_BIAS)


# ------------------------------------------------------------------ launch settings per shape


def pick_config(m: int, n: int, is_cuda: bool = True) -> dict:
    """Launch settings for M rows and N outputs (not tuned on hardware yet: the bench's
    --sweep prints the best of sweep_configs per shape). Small M is a weight-bandwidth GEMV:
    narrow N tiles, so that N = 4096 still gives 128 programs for 132 SMs (torch._scaled_mm's
    64 x 128 tiles give 32); large M wants the big tiles of a compute-bound GEMM."""
    if not is_cuda:
        return dict(INTERPRETER_CONFIG)
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=32 if n <= 8192 else 64, BLOCK_K=256, GROUP_M=1,
                    num_warps=4, num_stages=4)  # fmt: skip
    if m <= 64:
        return dict(BLOCK_M=32 if m <= 32 else 64, BLOCK_N=64, BLOCK_K=128, GROUP_M=1,
                    num_warps=4, num_stages=4)  # fmt: skip
    if m <= 256:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)


def smem_bytes(cfg: dict) -> int:
    """Shared memory of a config's pipelined operand tiles (x as 16-bit: the fused kernel)."""
    return (2 * cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * cfg["num_stages"]


def sweep_configs(m: int) -> list[dict]:
    """Launch settings worth timing at M rows (the bench's --sweep), within 160 KiB of tiles."""
    if m <= 16:
        tiles, group = [(16, bn, bk) for bn in (16, 32, 64) for bk in (128, 256, 512)], 1
        warps, stages = (2, 4), (3, 4, 6)
    elif m <= 256:
        tiles = [(bm, bn, 128) for bm in (32, 64) for bn in (32, 64, 128) if bm <= max(m, 32)]
        group, warps, stages = 8, (4, 8), (3, 4, 5)
    else:
        tiles = [(128, 128, 128), (128, 256, 128), (256, 128, 128), (128, 128, 64), (64, 256, 128)]
        group, warps, stages = 8, (4, 8), (3, 4)
    configs = [
        dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, num_warps=w, num_stages=s)
        for bm, bn, bk in tiles
        for w in warps
        for s in stages
    ]
    return [c for c in configs if smem_bytes(c) <= 160 * 1024]


# ------------------------------------------------------------------ entry points


def _launch(x, x_scale, w, w_scale, bias, static_scale, out_dtype, config) -> torch.Tensor:
    assert x.dim() == 2 and x.stride(-1) == 1 and w.stride(-1) == 1, "K must be contiguous"
    assert w_scale.is_contiguous() and w_scale.numel() == w.shape[0]
    m, k = x.shape
    n = w.shape[0]
    if config is None:
        config = pick_config(m, n, x.is_cuda)
    quant = x.dtype not in (FP8, torch.int8)
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m == 0:
        return out
    bm, bn = config["BLOCK_M"], config["BLOCK_N"]
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    unused = w_scale  # any tensor, for the pointers a variant does not read
    _w8a8_mm_kernel[grid](
        x, unused if x_scale is None else x_scale, w, w_scale, unused if bias is None else bias,
        unused if static_scale is None else static_scale,
        out, m, n, k, x.stride(0), w.stride(0), out.stride(0),
        QUANT=quant, STATIC=static_scale is not None, IS_FP8=w.dtype == FP8, QMAX=qmax(w.dtype),
        HAS_BIAS=bias is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=config["BLOCK_K"], GROUP_M=config["GROUP_M"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip
    return out


def w8a8_mm_triton(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """(xq [M, K] @ w [N, K]^T) * x_scale [M, 1] * w_scale [N, 1]^T -> out_dtype, + bias [N];
    xq and w both int8 or both float8_e4m3fn, scales float32."""
    assert xq.dtype == w.dtype and x_scale.is_contiguous() and x_scale.numel() == xq.shape[0]
    return _launch(xq, x_scale, w, w_scale, bias, None, out_dtype, config)


def w8a8_linear_triton(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    static_scale: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """x [M, K] (float) quantized per row (kiln.kernels.quant_act's quantize_rows: absmax, or
    the static scale []) and multiplied as w8a8_mm_triton, in one kernel; y in x's dtype."""
    assert x.is_floating_point() and x.dtype != FP8
    return _launch(x, None, w, w_scale, bias, static_scale, x.dtype, config)


def scale_epilogue_triton(
    acc: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """acc [M, N] (int32 or float32) * x_scale [M, 1] * w_scale [N, 1]^T -> out_dtype, + bias
    [N]: w8a8_mm_triton's epilogue, one pass over acc."""
    assert acc.dim() == 2 and acc.stride(-1) == 1
    assert x_scale.is_contiguous() and w_scale.is_contiguous()
    m, n = acc.shape
    out = torch.empty(m, n, dtype=out_dtype, device=acc.device)
    bm, bn = (8, 16) if not acc.is_cuda else (16, 256)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    if m > 0:
        _scale_epilogue_kernel[grid](
            acc, x_scale, w_scale, bias if bias is not None else w_scale, out,
            m, n, acc.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn,
        )  # fmt: skip
    return out
