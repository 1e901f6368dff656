"""Weight-only quantized Linear (W4A16 / W8A16): x [.., K] @ dequantize(packed)^T, int weights
read packed, float32 accumulation. Entry points: `quant_matmul_ref` (dequantize, then
F.linear), `quant_matmul_triton` and the dispatcher `quant_matmul`.

The packed layout: kiln.kernels.quant_layout (PackedWeight). `_launch` runs every path but
the long-prefill one (act-order gathered in the kernel).

Three paths, by the number of rows M (pick_config):
- M <= 4 (decode): the split-K GEMV of kiln.kernels.quant_gemv (each field turned into a
  float32 by placing its bits in a mantissa, one FMA an element, one scale a group of words;
  programs over slices of K, partial sums added by a second kernel);
- 4 < M < DEQUANT_MIN_M: a tiled GEMM that dequantizes each [BLOCK_N, BLOCK_W] word tile
  field by field (one exact FMA an element) to the activations' dtype and multiplies it with
  tl.dot (float32 accumulator);
- M >= DEQUANT_MIN_M (long prefill): the whole weight dequantized by one kernel, then cuBLAS
  (its cost is a small share of the GEMM's at these sizes).
Other engines' Triton int4 kernels (vLLM's AWQ GEMM, GPTQ-triton) unpack with tl.interleave
or reload each word once per field; the chunked layout avoids both. (Variants with the
RMSNorm or SiLU-and-mul before the projection fused in, as kiln.kernels.gemv has for bf16,
were removed in session 12: every program recomputed the prologue over all of K, and they
decoded at half the speed of the plain kernel after a separate norm kernel, H100 session 10.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.kernels import quant_gemv
from kiln.kernels._triton import num_sms, tl, triton, use_triton
from kiln.kernels.common import dot_options
from kiln.kernels.quant_layout import PackedWeight, dequantize_ref

DEQUANT_MIN_M = 1024
# The interpreter (CPU tests) uses small tiles, so that tiny shapes cross tile boundaries.
INTERPRETER_CONFIG = dict(BLOCK_N=16, BLOCK_W=16, num_warps=4, num_stages=1)


def quant_matmul_ref(
    x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain torch: F.linear(x[..., perm], dequantize_ref(w) in x's dtype, bias)."""
    if w.perm is not None:
        x = x.index_select(-1, w.perm)
    return F.linear(x, dequantize_ref(w).to(x.dtype), bias)


# ---------------------------------------------------------------- kernels


@triton.jit
def _field(words, I: tl.constexpr, BITS: tl.constexpr):
    """1 + q / 2^BITS as float32 for bit field I of each word: the field moved to the top of a
    float32 mantissa under exponent 0 (exact, and cheaper than an int-to-float conversion)."""
    SHIFT: tl.constexpr = 23 - BITS * (I + 1)
    if SHIFT >= 0:
        v = words << SHIFT
    else:
        v = words >> (-SHIFT)
    v = (v & (((1 << BITS) - 1) << (23 - BITS))) | 0x3F800000
    return v.to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["M", "stride_xm", "stride_om"])
def _quant_matmul_kernel(
    x_ptr, perm_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K, KW, NC, stride_xm, stride_om,
    BITS: tl.constexpr, W: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_PERM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    """out[M, N] = x[M, K] @ W^T (+ bias), one [BLOCK_M, BLOCK_N] tile a program, looping over
    the K / PACK words of its rows BLOCK_W at a time: each word tile dequantized field by
    field to x's dtype (one exact FMA an element) and multiplied with tl.dot; x gathered at
    perm (act-order) when HAS_PERM."""
    PACK: tl.constexpr = 32 // BITS
    CHUNK: tl.constexpr = PACK * W
    ONE: tl.constexpr = 1 << BITS  # the fields come as 1 + q / ONE
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_W)
    m_ok, n_ok = offs_m < M, offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # [BLOCK_M, 1]
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * KW  # [BLOCK_N, 1]
    s_rows = s_ptr + offs_n[:, None].to(tl.int64) * NC
    z_rows = z_ptr + offs_n[:, None].to(tl.int64) * NC
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for w0 in range(0, KW, BLOCK_W):
        cols = w0 + offs_w  # [BLOCK_W] word columns
        chunk = cols // W
        k_first = chunk * CHUNK + cols % W  # the input of each word's field 0
        w_mask = n_ok[:, None] & (cols[None, :] < KW)
        words = tl.load(w_rows + cols[None, :], mask=w_mask, other=0,
                        eviction_policy="evict_first")  # fmt: skip
        s = tl.load(s_rows + chunk[None, :], mask=w_mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_rows + chunk[None, :], mask=w_mask, other=0.0).to(tl.float32)
        else:
            z = tl.full([BLOCK_N, BLOCK_W], 1 << (BITS - 1), dtype=tl.float32)
        # s * (q - z) = (1 + q/ONE) * (ONE * s) - (ONE + z) * s: one FMA a field, exact
        a, b = s * ONE, -(ONE + z) * s  # (both products are exact in float32)
        for i in tl.static_range(PACK):
            ks = k_first + i * W
            k_ok = ks < K
            if HAS_PERM:
                ks = tl.load(perm_ptr + ks, mask=k_ok, other=0)
            xi = tl.load(x_rows + ks[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0,
                         eviction_policy="evict_last")  # fmt: skip
            wi = tl.fma(_field(words, i, BITS), a, b).to(xi.dtype)  # [BLOCK_N, BLOCK_W]
            if DOT_UPCAST:  # the interpreter multiplies bfloat16 tiles wrongly
                acc = tl.dot(xi.to(tl.float32), tl.trans(wi.to(tl.float32)), acc,
                             input_precision=DOT_PRECISION)  # fmt: skip
            else:
                acc = tl.dot(xi, tl.trans(wi), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _dequantize_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, N, K, KW, NC,
    BITS: tl.constexpr, W: tl.constexpr, HAS_ZEROS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """out[N, K] = the dequantized weight in out's dtype, one [BLOCK_N, BLOCK_W] word tile a
    program."""
    PACK: tl.constexpr = 32 // BITS
    ONE: tl.constexpr = 1 << BITS
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    chunk = cols // W
    k_first = chunk * (PACK * W) + cols % W
    mask = (offs_n[:, None] < N) & (cols[None, :] < KW)
    rows = offs_n[:, None].to(tl.int64)
    words = tl.load(w_ptr + rows * KW + cols[None, :], mask=mask, other=0)
    s = tl.load(s_ptr + rows * NC + chunk[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(z_ptr + rows * NC + chunk[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        z = tl.full([BLOCK_N, BLOCK_W], 1 << (BITS - 1), dtype=tl.float32)
    a, b = s * ONE, -(ONE + z) * s  # as in _quant_matmul_kernel
    for i in tl.static_range(PACK):
        ks = k_first + i * W
        wi = tl.fma(_field(words, i, BITS), a, b)
        tl.store(out_ptr + rows * K + ks[None, :], wi.to(out_ptr.dtype.element_ty),
                 mask=mask & (ks[None, :] < K))  # fmt: skip


def pick_config(m: int, w: PackedWeight, is_cuda: bool, sms: int = 132) -> dict:
    """Launch settings by row count: M <= 4 the split-K GEMV's (quant_gemv.default_config),
    above the tensor-core tiles of matmul_config."""
    if m <= quant_gemv.MAX_M:
        return quant_gemv.default_config(m, w, is_cuda, sms)
    return matmul_config(m, is_cuda)


def matmul_config(m: int, is_cuda: bool) -> dict:
    """_quant_matmul_kernel's settings for M > 4 rows: a guess from the arithmetic below, not
    yet measured (sweep on an H100: benchmarks/bench_quant.py --sweep). Each weight tile is
    dequantized once per BLOCK_M rows (4 ALU operations an element), so BLOCK_M grows to 128
    (the tensor cores, not the dequantization, then bound it), 64 columns wide so that
    N = 4096 at M = 256 still gives 128 programs."""
    if not is_cuda:
        return dict(INTERPRETER_CONFIG, BLOCK_M=16)
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_W=32, num_warps=4, num_stages=3)
    if m <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_W=32, num_warps=4, num_stages=3)
    # BLOCK_W 16 (a 128-input K step): at 32 the three stages of 128 x 256 bf16 x tiles alone
    # ask for more shared memory than an H100 has (280 KiB needed, 227 KiB there)
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_W=16, num_warps=8, num_stages=3)


def sweep_configs(m: int) -> list[dict]:
    """Candidate launch settings for M rows (benchmarks/bench_quant.py): for M <= 4 the
    split-K GEMV's (quant_gemv.sweep_configs) and a few tensor-core tiles (M padded to 16)."""
    dots = [
        dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_W=bw, num_warps=nw, num_stages=ns)
        for bm, bn, bw, nw, ns in [(16, 16, 64, 4, 4), (16, 32, 32, 4, 3), (16, 64, 32, 4, 3),
                                   (32, 64, 32, 4, 3), (64, 64, 32, 4, 3), (64, 128, 32, 4, 3),
                                   (128, 128, 32, 8, 3), (64, 128, 16, 4, 4), (128, 64, 32, 8, 3),
                                   (64, 64, 64, 4, 3), (128, 32, 32, 4, 3), (256, 32, 32, 8, 3)]
    ]  # fmt: skip
    if m <= quant_gemv.MAX_M:
        return quant_gemv.sweep_configs(m) + dots[:3]
    return [c for c in dots if c["BLOCK_M"] <= max(16, triton.next_power_of_2(m))]


def dequantize_triton(w: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] in `dtype` (permuted input order), by one Triton kernel."""
    n, kw = w.qweight.shape
    out = torch.empty(n, w.in_features, dtype=dtype, device=w.qweight.device)
    block_n, block_w = 32, 32
    _dequantize_kernel[(triton.cdiv(n, block_n), triton.cdiv(kw, block_w))](
        w.qweight, w.scales, w.zeros if w.zeros is not None else w.scales, out,
        n, w.in_features, kw, w.scales.shape[1],
        BITS=w.bits, W=w.words, HAS_ZEROS=w.zeros is not None, BLOCK_N=block_n, BLOCK_W=block_w,
    )  # fmt: skip
    return out


def _launch(
    x2: torch.Tensor,  # [M, K], unit stride along the row
    w: PackedWeight,
    bias: torch.Tensor | None,
    config: dict | None,
) -> torch.Tensor:
    m, (n, kw) = x2.shape[0], w.qweight.shape
    assert x2.stride(-1) == 1
    if m == 0:
        return torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    if config is None:
        config = pick_config(m, w, x2.is_cuda, num_sms(x2.device))
    if "SPLIT_K" in config:  # M <= 4: the split-K GEMV
        return quant_gemv.quant_gemv_triton(x2, w, bias, config)
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    config = dict(config)
    block_m, block_n = config.pop("BLOCK_M"), config.pop("BLOCK_N")
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _quant_matmul_kernel[grid](
        x2, w.perm if w.perm is not None else w.qweight, w.qweight, w.scales,
        w.zeros if w.zeros is not None else w.scales, bias if bias is not None else w.scales,
        out, m, n, w.in_features, kw, w.scales.shape[1], x2.stride(0), out.stride(0),
        BITS=w.bits, W=w.words, HAS_ZEROS=w.zeros is not None, HAS_BIAS=bias is not None,
        HAS_PERM=w.perm is not None, BLOCK_M=block_m, BLOCK_N=block_n, **dot_options(x2),
        **config,
    )  # fmt: skip
    return out


def quant_matmul_triton(
    x: torch.Tensor,
    w: PackedWeight,
    bias: torch.Tensor | None = None,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """Triton x [..., K] @ dequantize(w)^T (+ bias [N]) -> [..., N] in x's dtype."""
    assert x.shape[-1] == w.in_features, f"x has {x.shape[-1]} features, weight {w.in_features}"
    x2 = x.reshape(-1, x.shape[-1])
    if config is None and x2.shape[0] >= DEQUANT_MIN_M and x2.is_cuda:
        if w.perm is not None:
            x2 = x2.index_select(-1, w.perm)
        out = F.linear(x2, dequantize_triton(w, x2.dtype), bias)
    else:
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        out = _launch(x2, w, bias, config)
    return out.view(*x.shape[:-1], w.out_features)


def quant_matmul(
    x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ dequantize(w)^T (+ bias): the Triton kernels on CUDA, the reference elsewhere."""
    if use_triton(x):
        return quant_matmul_triton(x, w, bias)
    return quant_matmul_ref(x, w, bias)
