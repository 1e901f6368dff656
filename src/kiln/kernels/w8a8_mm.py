"""W8A8 GEMM in Triton: y = (x_q @ W_q^T) * x_scale * w_scale^T (+ bias), the 8-bit products
accumulated exactly (int8 -> int32) or in float32 (e4m3), and the scales, the bias and the
cast to the output dtype applied to the accumulator tile before it leaves the registers. The
contract is kiln.model.w8a8's w8a8_mm_reference, then `+ bias` in the output dtype (the same
two roundings), so int8 gives the reference's exact bytes wherever its float32 matmul is
exact (|accumulator| < 2^24), on every path here.

- `w8a8_mm_triton(xq, x_scale, ...)`: x already quantized (kiln.kernels.quant_act), scales
  [M, 1]; a tiled tensor-core GEMM (tl.dot) with grouped tile order;
- `w8a8_gemv_triton(x, ...)`: decode's few rows (M <= GEMV_MAX_M) in one launch: x in float,
  each program finds its rows' absmax (or takes the static scale) and quantizes each x chunk
  as it loads it (quant_act.quantize_block, the quantization kernel's steps, so the same
  bytes), then multiplies by broadcast-and-sum on the CUDA cores (int32 products and sums
  for int8: exact). Quantizing in the GEMM costs every program M x K quantizations for its
  BLOCK_N x K weights: cheap at M = 1..4 against the weight stream, which is why the fused
  kernel is a GEMV and not the tensor-core GEMM, whose 16-row tiles would quantize 16 rows
  in each of N / BLOCK_N programs;
- `scale_epilogue_triton`: the epilogue alone, for torch._int_mm's int32 output: one pass
  instead of four elementwise kernels (float, * x_scale, * w_scale, to bf16) over [M, N].

W [N, K] is read K-major (row-major [N, K], the layout 8-bit wgmma and cuBLASLt's IMMA path
want), as the [BLOCK_K, BLOCK_N] tiles of W^T.
"""

from __future__ import annotations

import torch

from kiln.kernels._triton import tl, triton
from kiln.kernels.common import grouped_tile
from kiln.kernels.quant_act import FP8, qmax, quantize_block, row_scale

GEMV_MAX_M = 16  # the fused GEMV takes up to this many rows (the dispatcher: fewer)
MIN_PROGRAMS = 128  # the weight-streaming GEMM configs keep about one program an SM (H100: 132)
# The interpreter (CPU tests) uses small tiles, so that tiny shapes cross tile boundaries.
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)
INTERPRETER_GEMV_CONFIG = dict(BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=1)


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
    x_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_wn, stride_om,
    IS_FP8: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M, BLOCK_N] tile of y from 8-bit x [M, K] (scales xs [M]) and W [N, K]."""
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
    if IS_FP8:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IS_FP8:  # promoted to the float32 accumulator every BLOCK_K (Triton's sm_90
            # default accumulates e4m3 products at the tensor core's reduced precision all
            # along K, as _scaled_mm's use_fast_accum=True; _scaled_mm's default promotes)
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
        else:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    x_scale = tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)
    _scale_store(acc, x_scale, offs_m, offs_n, ws_ptr, bias_ptr, out_ptr, M, N, stride_om, HAS_BIAS)


@triton.jit(do_not_specialize=["M", "stride_xm", "stride_om"])
def _w8a8_gemv_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, static_ptr, out_ptr,
    M, N, K, stride_xm, stride_wn, stride_om,
    STATIC: tl.constexpr, IS_FP8: tl.constexpr, QMAX: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """BLOCK_N outputs of all M (<= BLOCK_M) rows: x (float) quantized per row here, the
    8-bit products summed on the CUDA cores (int32 for int8, float32 for e4m3: both exact
    products), one pass over the program's [BLOCK_N, K] weight slice."""
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    if STATIC:
        x_scale = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(static_ptr).to(tl.float32)
    else:  # every program reads its rows whole first (from L2: they are small)
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask = row_ok[:, None] & (offs_k[None, :] < K - k0)
            x = tl.load(x_rows + k0 + offs_k[None, :], mask=mask, other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
        x_scale = row_scale(amax, QMAX)
    if IS_FP8:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs_k
        k_ok = cols < K
        x = tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        q = quantize_block(x.to(tl.float32), x_scale[:, None], QMAX, IS_FP8)  # [BM, BK]
        w = tl.load(w_rows + cols[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0,
                    eviction_policy="evict_first")  # fmt: skip
        if IS_FP8:
            qv, wv = q.to(tl.float32), w.to(tl.float32)
        else:
            qv, wv = q.to(tl.int32), w.to(tl.int32)
        if BLOCK_M == 1:
            acc += tl.sum(wv * qv, axis=1)[None, :]  # [BN, BK] * [1, BK]
        else:
            acc += tl.sum(qv[:, None, :] * wv[None, :, :], axis=2)
    _scale_store(acc, x_scale, rows, offs_n, ws_ptr, bias_ptr, out_ptr, M, N, stride_om, HAS_BIAS)


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


def gemv_config(m: int, n: int, is_cuda: bool = True) -> dict:
    """Launch settings of the fused GEMV at M rows (not tuned on hardware yet: the bench's
    --sweep). About 8 Ki weights (8 KiB) a program in flight at M = 1, as kiln.kernels.gemv
    found for bf16, and a [M, BLOCK_N, BLOCK_K] product of at most 8 Ki elements (64 float32
    registers a thread at 4 warps); N = 4096 gives 256 programs at M = 1."""
    if not is_cuda:
        return dict(INTERPRETER_GEMV_CONFIG)
    block_m = triton.next_power_of_2(m)
    block_k = 512 if block_m <= 2 else 256
    block_n = max(1, 8192 // (block_m * block_k))
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=2)


def gemv_sweep_configs(m: int) -> list[dict]:
    """Fused-GEMV launch settings worth timing at M rows (at most 32 Ki product elements)."""
    block_m = triton.next_power_of_2(m)
    configs = [
        dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s)
        for bn in (4, 8, 16, 32)
        for bk in (256, 512, 1024)
        for w in (4, 8)
        for s in (1, 2, 3)
    ]
    return [c for c in configs if block_m * c["BLOCK_N"] * c["BLOCK_K"] <= 32768]


def pick_config(m: int, n: int, is_cuda: bool = True) -> dict:
    """Launch settings of the tensor-core GEMM for M rows and N outputs (not tuned on hardware
    yet: the bench's --sweep prints the best of sweep_configs per shape). Up to 256 rows the
    GEMM streams the weight, past that it is compute-bound; either way the tiles shrink (N
    down to 32 columns, or 128 past 256 rows, then M to 64 rows) until there are MIN_PROGRAMS
    programs: N = 4096 at M <= 64 gets 128 programs of 32 columns, where torch._scaled_mm's
    64 x 128 tiles give 32 for 132 SMs."""
    if not is_cuda:
        return dict(INTERPRETER_CONFIG)
    if m <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=4)
    elif m <= 64:
        cfg = dict(BLOCK_M=triton.next_power_of_2(m), BLOCK_N=64, BLOCK_K=128, GROUP_M=1,
                   num_warps=4, num_stages=4)  # fmt: skip
    elif m <= 256:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
    min_n = 32 if m <= 256 else 128
    while triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]) < MIN_PROGRAMS:
        if cfg["BLOCK_N"] > min_n:
            cfg["BLOCK_N"] //= 2
        elif m > 256 and cfg["BLOCK_M"] > 64:
            cfg["BLOCK_M"] //= 2
        else:
            break
    return cfg


def smem_bytes(cfg: dict) -> int:
    """Shared memory of a GEMM config's pipelined 8-bit operand tiles."""
    return (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * cfg["num_stages"]


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
    assert xq.dim() == 2 and xq.stride(-1) == 1 and w.stride(-1) == 1, "K must be contiguous"
    assert xq.dtype == w.dtype and x_scale.is_contiguous() and x_scale.numel() == xq.shape[0]
    assert w_scale.is_contiguous() and w_scale.numel() == w.shape[0]
    m, k = xq.shape
    n = w.shape[0]
    config = config or pick_config(m, n, xq.is_cuda)
    out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0:
        return out
    bm, bn = config["BLOCK_M"], config["BLOCK_N"]
    _w8a8_mm_kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](
        xq, x_scale, w, w_scale, w_scale if bias is None else bias, out,
        m, n, k, xq.stride(0), w.stride(0), out.stride(0),
        IS_FP8=w.dtype == FP8, HAS_BIAS=bias is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=config["BLOCK_K"], GROUP_M=config["GROUP_M"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip
    return out


def w8a8_gemv_triton(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    static_scale: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """x [M, K] (float, M <= GEMV_MAX_M) quantized per row (kiln.kernels.quant_act's
    quantize_rows: absmax, or the static scale []) and multiplied as w8a8_mm_triton, in one
    kernel; y in x's dtype."""
    assert x.dim() == 2 and x.stride(-1) == 1 and w.stride(-1) == 1, "K must be contiguous"
    assert x.is_floating_point() and x.dtype != FP8
    assert w_scale.is_contiguous() and w_scale.numel() == w.shape[0]
    m, k = x.shape
    n = w.shape[0]
    assert m <= GEMV_MAX_M, f"the fused GEMV takes at most {GEMV_MAX_M} rows, got {m}"
    config = config or gemv_config(m, n, x.is_cuda)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    unused = w_scale  # any tensor, for the pointers a variant does not read
    _w8a8_gemv_kernel[(triton.cdiv(n, config["BLOCK_N"]),)](
        x, w, w_scale, unused if bias is None else bias,
        unused if static_scale is None else static_scale, out,
        m, n, k, x.stride(0), w.stride(0), out.stride(0),
        STATIC=static_scale is not None, IS_FP8=w.dtype == FP8, QMAX=qmax(w.dtype),
        HAS_BIAS=bias is not None, BLOCK_M=triton.next_power_of_2(m),
        BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip
    return out


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
