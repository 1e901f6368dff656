"""The decode GEMV of weight-only quantized Linears (W4A16 / W8A16) at M <= 4 rows, split over
K: out [M, N] = x [M, K] @ dequantize(packed)^T (+ bias), in the packed layout of
kiln.kernels.quant_layout. kiln.kernels.quant_linear dispatches to it; its reference is
quant_linear.quant_matmul_ref.

At batch 1..4 the product costs one read of the packed weight, and that read is fast only with
enough bytes in flight on every SM: one program per 16 output rows over the whole K gave 64
programs on a k/v projection (N = 1024), and 256 on a down projection (K = 14336) whose
programs each walked K alone (470-1,130 GB/s on an H100, session 10). So the grid is
(N / BLOCK_N, SPLIT_K): program (n, k) multiplies the M rows of x by BLOCK_N weight rows over
slice k of K (SLICE words, whole steps of BLOCK_W words: a slice may end inside a group, and
its groups' scales stay right, since each V-word group of a step lies in one chunk and takes
that chunk's scale and zero). It loads the next step's words while it multiplies the current
ones (Triton does not pipeline a loop without tl.dot), and its first step before it waits
for the previous kernel (programmatic dependent launch). With SPLIT_K > 1 each program writes
float32 partial sums to a [SPLIT_K, M, N] workspace and `_split_k_sum_kernel` adds them in
slice order (deterministic: no atomics), adds the bias and casts; SPLIT_K = 1 writes the
output directly. No host sync: the launch is CUDA-graph capturable.

Per element: a shift and a mask place the field in a float32 mantissa (`field`: no
int-to-float conversion, whose throughput is a quarter of an FMA's; one shift serves both
4-bit fields of a byte) and one FMA adds it, times x, to t; once a step, per row and group
of V words (one scale, one zero), sum s * (q - z) * x = s * (2^bits * (t - XS') - z * XS),
with XS the group's sum of x and XS' the same with the inputs scaled as `field` asks.
Each thread holds V = 4 contiguous words of each of its BLOCK_N rows (one 16-byte load) and
loads the matching x values of a field once (one 8-byte load) for all its rows; the M rows of
x each have their own accumulators, so that each field, once extracted, serves all of them.
"""

from __future__ import annotations

import math

import torch

from kiln.kernels._triton import (
    gdc_launch_dependents,
    gdc_wait,
    pdl_enter,
    pdl_options,
    tl,
    triton,
    use_pdl,
)
from kiln.kernels.quant_layout import PackedWeight

MAX_M = 4  # rows of x, at most (each has its own accumulators in the kernel)
SPLIT_K_CHOICES = (1, 2, 4, 8, 16)
PROGRAMS_PER_SM = 8  # the default SPLIT_K grows the grid to this many (one-warp) programs an SM
MIN_SLICE_CHUNKS = 4  # ... keeping each slice of K at least this many chunks long
# The interpreter (CPU tests) uses small tiles, so that tiny shapes cross tile boundaries.
INTERPRETER_CONFIG = dict(BLOCK_N=16, BLOCK_W=16, SPLIT_K=2, num_warps=1, num_stages=1)
SUM_BLOCK = 512  # outputs a program of the split-K sum (4 a thread)
# Measured best launch settings by (bits, K, N, M), from `benchmarks/bench_quant.py --part
# gemv` on an H100 (it prints this dict; session 12, H100 80GB HBM3, Triton 3.6, Llama-3-8B's
# shapes); shapes not here take default_config's guess.
TUNED: dict[tuple[int, int, int, int], dict] = {
    (4, 4096, 6144, 1): dict(BLOCK_N=8, BLOCK_W=256, SPLIT_K=1, num_warps=2, num_stages=1),
    (4, 4096, 6144, 2): dict(BLOCK_N=4, BLOCK_W=128, SPLIT_K=1, num_warps=1, num_stages=1),
    (4, 4096, 6144, 4): dict(BLOCK_N=4, BLOCK_W=128, SPLIT_K=2, num_warps=1, num_stages=1),
    (8, 4096, 6144, 1): dict(BLOCK_N=8, BLOCK_W=256, SPLIT_K=1, num_warps=2, num_stages=1),
    (8, 4096, 6144, 2): dict(BLOCK_N=2, BLOCK_W=128, SPLIT_K=1, num_warps=1, num_stages=1),
    (8, 4096, 6144, 4): dict(BLOCK_N=4, BLOCK_W=128, SPLIT_K=1, num_warps=1, num_stages=1),
    (4, 4096, 4096, 1): dict(BLOCK_N=4, BLOCK_W=512, SPLIT_K=1, num_warps=4, num_stages=1),
    (4, 4096, 4096, 2): dict(BLOCK_N=8, BLOCK_W=128, SPLIT_K=4, num_warps=1, num_stages=1),
    (4, 4096, 4096, 4): dict(BLOCK_N=4, BLOCK_W=128, SPLIT_K=1, num_warps=1, num_stages=1),
    (8, 4096, 4096, 1): dict(BLOCK_N=4, BLOCK_W=512, SPLIT_K=1, num_warps=4, num_stages=1),
    (8, 4096, 4096, 2): dict(BLOCK_N=4, BLOCK_W=256, SPLIT_K=1, num_warps=2, num_stages=1),
    (8, 4096, 4096, 4): dict(BLOCK_N=4, BLOCK_W=128, SPLIT_K=4, num_warps=1, num_stages=1),
    (4, 4096, 28672, 1): dict(BLOCK_N=4, BLOCK_W=128, SPLIT_K=1, num_warps=1, num_stages=1),
    (4, 4096, 28672, 2): dict(BLOCK_N=8, BLOCK_W=128, SPLIT_K=1, num_warps=1, num_stages=1),
    (4, 4096, 28672, 4): dict(BLOCK_N=4, BLOCK_W=128, SPLIT_K=1, num_warps=1, num_stages=1),
    (8, 4096, 28672, 1): dict(BLOCK_N=4, BLOCK_W=128, SPLIT_K=4, num_warps=1, num_stages=1),
    (8, 4096, 28672, 2): dict(BLOCK_N=4, BLOCK_W=128, SPLIT_K=1, num_warps=1, num_stages=1),
    (8, 4096, 28672, 4): dict(BLOCK_N=4, BLOCK_W=128, SPLIT_K=1, num_warps=1, num_stages=1),
    (4, 14336, 4096, 1): dict(BLOCK_N=8, BLOCK_W=128, SPLIT_K=4, num_warps=1, num_stages=1),
    (4, 14336, 4096, 2): dict(BLOCK_N=8, BLOCK_W=128, SPLIT_K=4, num_warps=1, num_stages=1),
    (4, 14336, 4096, 4): dict(BLOCK_N=4, BLOCK_W=128, SPLIT_K=1, num_warps=1, num_stages=1),
    (8, 14336, 4096, 1): dict(BLOCK_N=4, BLOCK_W=512, SPLIT_K=1, num_warps=4, num_stages=1),
    (8, 14336, 4096, 2): dict(BLOCK_N=4, BLOCK_W=256, SPLIT_K=1, num_warps=2, num_stages=1),
    (8, 14336, 4096, 4): dict(BLOCK_N=4, BLOCK_W=128, SPLIT_K=4, num_warps=1, num_stages=1),
}


@triton.jit
def field(words, ones, float_one, I: tl.constexpr, BITS: tl.constexpr):
    """Bit field I of each word as float32 1 + q * 2^(P - 23): the field placed at bit P of a
    float32 mantissa under exponent 0 (a shift and a mask: exact, and cheaper than an
    int-to-float conversion). One shift serves a byte's fields: each byte moves so that its
    bit 0 lands on bit 15, so P = 15 + BITS * (I's place in its byte); the input it multiplies
    is scaled by 2^(23 - BITS - P) (16 for a byte's low nibble at 4 bits, else 1) so that
    every product carries q * x / 2^BITS. `ones` (2^BITS - 1) and `float_one` (0x3F800000)
    come as runtime values: as literals, ptxas rematerializes the mask into a register before
    nearly every use (a move a field, seen in sm_90 SASS)."""
    SHIFT: tl.constexpr = 15 - 8 * (I // (8 // BITS))
    P: tl.constexpr = 15 + BITS * (I % (8 // BITS))
    if SHIFT >= 0:
        v = words << SHIFT
    else:
        v = words >> (-SHIFT)
    v = (v & (ones << P)) | float_one
    return v.to(tl.float32, bitcast=True)


@triton.jit
def _load_words(w_tile, w0, hi, n_ok, BLOCK_N: tl.constexpr, G: tl.constexpr, V: tl.constexpr,
                EVEN: tl.constexpr):  # fmt: skip
    """The words of the step at word w0 (zeros past hi: the slice's end), loaded as the
    [BLOCK_N, BLOCK_W] tile w_tile + w0 and split into [BLOCK_N, G, V]: a 3-D load's layout
    varies across Triton versions (3.6 spreads a warp's threads over rows, not groups, and
    converts every field to x's layout through shared memory)."""
    cols = tl.arange(0, G * V)
    if EVEN:  # whole steps and rows: a step lies wholly inside the slice or past it
        mask = (w0 + 0 * cols)[None, :] < hi  # (one predicate: 0 * cols folds away)
    else:
        mask = n_ok[:, None] & ((w0 + cols) < hi)[None, :]
    words = tl.load(w_tile + w0, mask=mask, other=0, eviction_policy="evict_first")
    return tl.reshape(words, [BLOCK_N, G, V])


@triton.jit
def _load_group(ptrs, mask, EVEN: tl.constexpr):
    """A scale or zero of each row and group of the step, as float32 (0 where masked)."""
    if EVEN:
        return tl.load(ptrs).to(tl.float32)
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _fma_row(t, xo, xe, f, x_row, ks, k_ok, I: tl.constexpr, BITS: tl.constexpr,
             EVEN: tl.constexpr):  # fmt: skip
    """One row of x times field I: t += f * x * C ([BLOCK_N, G, V]), C = 2^(23 - BITS - P) for
    the field's mantissa place P (see field); x summed into xe ([1, G, V]) for the fields of
    scale 16, else into xo."""
    if EVEN:
        x = tl.load(x_row + ks)
    else:
        x = tl.load(x_row + ks, mask=k_ok, other=0.0)
    x = x.to(tl.float32)
    C: tl.constexpr = 1 << (8 - BITS - BITS * (I % (8 // BITS)))
    if C == 1:
        return t + f * x, xo + x, xe
    return t + f * (x * C), xo, xe + x


@triton.jit
def _add_group_sums(acc, t, xo, xe, s, z, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """acc [BLOCK_N, G] += the step's sum of s * (q - z) * x over each group's V words, for
    one row of x: s * (ONE * (T - XS') - z * XS) with T = sum t, XS' = XO + 16 * XE (the
    inputs as `field` scaled them) and XS = XO + XE, from the x sums xo / xe; the terms of x
    alone are formed once for all the BLOCK_N weight rows."""
    ONE: tl.constexpr = 1 << BITS
    xo = tl.sum(xo, axis=2)  # [1, G]
    xs = xo
    u = xo * -ONE  # -ONE * XS'
    if BITS == 4:
        xe = tl.sum(xe, axis=2)
        xs += xe
        u -= xe * (ONE * 16)
    if HAS_ZEROS:
        inner = tl.sum(t, axis=2) * ONE + u - z * xs
    else:
        inner = tl.sum(t, axis=2) * ONE + (u - (1 << (BITS - 1)) * xs)
    return acc + s * inner


@triton.jit
def _store_row(acc, r, pid_k, offs_n, n_ok, b_ptr, out_ptr, part_ptr, M, N, stride_om,
               HAS_BIAS: tl.constexpr):  # fmt: skip
    """Row r of the program's result: its float32 partial sums into part[pid_k] when the
    grid splits K, else (+ bias) into out."""
    out = tl.sum(acc, axis=1)  # [BLOCK_N]
    if tl.num_programs(1) > 1:
        tl.store(part_ptr + (pid_k * M + r).to(tl.int64) * N + offs_n, out, mask=n_ok)
    else:
        if HAS_BIAS:
            out += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + r * stride_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _quant_gemv_kernel(
    x_ptr, perm_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr,
    M, N, K, KW, NC, stride_xm, stride_om, SLICE, ones, float_one,
    BITS: tl.constexpr, W: tl.constexpr, V: tl.constexpr, HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PERM: tl.constexpr, EVEN: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Program (n, k): the M = ROWS (<= 4) rows of x times output rows [n * BLOCK_N,
    +BLOCK_N) over words [k * SLICE, +SLICE) of each weight row; into part[k] (float32) when
    the grid splits K, else (+ bias) into out. The rows are spelled out one by one (each with
    its accumulators), so that each field, once extracted, serves all of them."""
    if PDL:
        gdc_launch_dependents()
    PACK: tl.constexpr = 32 // BITS
    CHUNK: tl.constexpr = PACK * W
    G: tl.constexpr = BLOCK_W // V  # V-word groups a row per step
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, G) * V  # first word of each group, from the step's start
    offs_v = tl.arange(0, V)
    n_ok = offs_n < N
    w_tile = w_ptr + offs_n[:, None].to(tl.int64) * KW + tl.arange(0, BLOCK_W)[None, :]
    s_rows = s_ptr + offs_n[:, None].to(tl.int64) * NC  # [BLOCK_N, 1]
    z_rows = z_ptr + offs_n[:, None].to(tl.int64) * NC
    lo = pid_k * SLICE
    hi = tl.minimum(lo + SLICE, KW)
    words = _load_words(w_tile, lo, hi, n_ok, BLOCK_N, G, V, EVEN)  # the weights wait for nothing
    if PDL:
        gdc_wait()
    acc0 = tl.zeros([BLOCK_N, G], dtype=tl.float32)  # row r's sums of s * (q - z) * x
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    for w0 in range(lo, hi, BLOCK_W):
        nxt = _load_words(w_tile, w0 + BLOCK_W, hi, n_ok, BLOCK_N, G, V, EVEN)
        chunk = (w0 + offs_g) // W  # [G]: each group's chunk (its scale and zero)
        # [1, G, V]: the inputs of field 0 (a multiple of V, written so for the compiler)
        k_first = (chunk * (CHUNK // V) + ((w0 + offs_g) % W) // V) * V
        k_first = (k_first[:, None] + offs_v[None, :])[None, :, :]
        s_mask = n_ok[:, None] & (w0 + offs_g < hi)[None, :]
        s = _load_group(s_rows + chunk[None, :], s_mask, EVEN)  # [BLOCK_N, G]
        z = s  # (unused when symmetric)
        if HAS_ZEROS:
            z = _load_group(z_rows + chunk[None, :], s_mask, EVEN)
        t0 = tl.zeros([BLOCK_N, G, V], dtype=tl.float32)
        xo0 = tl.zeros([1, G, V], dtype=tl.float32)
        t1, t2, t3, xo1, xo2, xo3 = t0, t0, t0, xo0, xo0, xo0
        xe0, xe1, xe2, xe3 = xo0, xo0, xo0, xo0
        for i in tl.static_range(PACK):
            ks = k_first + i * W
            k_ok = ks < K
            if HAS_PERM:
                ks = tl.load(perm_ptr + ks, mask=k_ok, other=0)
            f = field(words, ones, float_one, i, BITS)
            t0, xo0, xe0 = _fma_row(t0, xo0, xe0, f, x_ptr, ks, k_ok, i, BITS, EVEN)
            if ROWS > 1:
                x_row = x_ptr + stride_xm
                t1, xo1, xe1 = _fma_row(t1, xo1, xe1, f, x_row, ks, k_ok, i, BITS, EVEN)
            if ROWS > 2:
                x_row = x_ptr + 2 * stride_xm
                t2, xo2, xe2 = _fma_row(t2, xo2, xe2, f, x_row, ks, k_ok, i, BITS, EVEN)
            if ROWS > 3:
                x_row = x_ptr + 3 * stride_xm
                t3, xo3, xe3 = _fma_row(t3, xo3, xe3, f, x_row, ks, k_ok, i, BITS, EVEN)
        acc0 = _add_group_sums(acc0, t0, xo0, xe0, s, z, BITS, HAS_ZEROS)
        if ROWS > 1:
            acc1 = _add_group_sums(acc1, t1, xo1, xe1, s, z, BITS, HAS_ZEROS)
        if ROWS > 2:
            acc2 = _add_group_sums(acc2, t2, xo2, xe2, s, z, BITS, HAS_ZEROS)
        if ROWS > 3:
            acc3 = _add_group_sums(acc3, t3, xo3, xe3, s, z, BITS, HAS_ZEROS)
        words = nxt
    _store_row(acc0, 0, pid_k, offs_n, n_ok, b_ptr, out_ptr, part_ptr, M, N, stride_om, HAS_BIAS)
    if ROWS > 1:
        _store_row(acc1, 1, pid_k, offs_n, n_ok, b_ptr, out_ptr, part_ptr, M, N, stride_om,
                   HAS_BIAS)  # fmt: skip
    if ROWS > 2:
        _store_row(acc2, 2, pid_k, offs_n, n_ok, b_ptr, out_ptr, part_ptr, M, N, stride_om,
                   HAS_BIAS)  # fmt: skip
    if ROWS > 3:
        _store_row(acc3, 3, pid_k, offs_n, n_ok, b_ptr, out_ptr, part_ptr, M, N, stride_om,
                   HAS_BIAS)  # fmt: skip


@triton.jit
def _split_k_sum_kernel(
    part_ptr, b_ptr, out_ptr, N, stride_om,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """out[m, n] = part[0, m, n] + part[1, m, n] + .. (+ bias[n]), in that order, in out's
    dtype: program (n, m) for BLOCK outputs of row m. The loop is unrolled, so that the
    SPLIT_K loads are all in flight at once (not one L2 round trip after another)."""
    pdl_enter(PDL)
    pid_n, m = tl.program_id(0), tl.program_id(1)
    M = tl.num_programs(1)
    offs = pid_n * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + (k * M + m).to(tl.int64) * N + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + m.to(tl.int64) * stride_om + offs, acc.to(out_ptr.dtype.element_ty),
             mask=ok)  # fmt: skip


def default_split_k(tiles: int, kw: int, min_slice: int, sms: int) -> int:
    """SPLIT_K for a grid of `tiles` one-warp programs over K = kw words: doubled (up to 16)
    while the grid has fewer than PROGRAMS_PER_SM programs an SM and the slices stay at least
    `min_slice` words long."""
    split = 1
    while (
        split < SPLIT_K_CHOICES[-1]
        and tiles * split < PROGRAMS_PER_SM * sms
        and kw >= 2 * split * min_slice
    ):
        split *= 2
    return split


def default_config(m: int, w: PackedWeight, is_cuda: bool, sms: int) -> dict:
    """Launch settings: TUNED's for a measured shape, else a guess (not measured on a GPU).

    The guess: one warp a program (the layout rule in sweep_configs), 8 output rows a program
    at M = 1 (each thread: 4 words of each of 8 rows, its x values loaded once for the 8),
    4 at M = 2, 2 at M = 3..4 (each row of x has its own accumulators), 128 words a row a step
    (4 KiB at M = 1, and the next step's as many in flight); SPLIT_K from default_split_k,
    slices at least MIN_SLICE_CHUNKS chunks and one step long. The interpreter: small tiles
    and SPLIT_K = 2, so that tests cross tile and slice boundaries.
    """
    if not is_cuda:
        return dict(INTERPRETER_CONFIG)
    n, kw = w.qweight.shape
    tuned = TUNED.get((w.bits, w.in_features, n, m))
    if tuned is not None:
        return dict(tuned)
    block_n, block_w = {1: 8, 2: 4}.get(m, 2), 128
    min_slice = max(block_w, MIN_SLICE_CHUNKS * w.words)
    split = default_split_k(triton.cdiv(n, block_n), kw, min_slice, sms)
    return dict(BLOCK_N=block_n, BLOCK_W=block_w, SPLIT_K=split, num_warps=1, num_stages=1)


def sweep_configs(m: int) -> list[dict]:
    """Candidate launch settings at M rows (benchmarks/bench_quant.py --part gemv): a few
    tiles (BLOCK_N, BLOCK_W, num_warps, num_stages) times every SPLIT_K.

    BLOCK_W is 128 words a warp: a step's x values of one field ([BLOCK_W] inputs) must give
    each thread its own 4 (one 8-byte load), or Triton lays them out apart from the words and
    converts one to the other every field (through shared memory or shuffles). Smaller
    BLOCK_N as M grows (the accumulators of M rows share the registers). A step is 2-16 KiB
    of words (4 bytes x BLOCK_N x BLOCK_W), with the next one in flight too. num_stages: Triton
    does not software-pipeline this loop (no tl.dot), the kernel prefetches the next step
    itself; one tile asks for 3 stages all the same, in case a Triton version does.
    """
    tiles = {
        1: [(8, 128, 1, 1), (4, 128, 1, 1), (8, 256, 2, 1), (4, 512, 4, 1), (8, 512, 4, 1),
            (8, 128, 1, 3)],
        2: [(4, 128, 1, 1), (8, 128, 1, 1), (2, 128, 1, 1), (4, 256, 2, 1)],
    }.get(m, [(2, 128, 1, 1), (4, 128, 1, 1), (2, 256, 2, 1), (1, 128, 1, 1)])  # fmt: skip
    return [
        dict(BLOCK_N=bn, BLOCK_W=bw, SPLIT_K=split, num_warps=nw, num_stages=ns)
        for bn, bw, nw, ns in tiles
        for split in SPLIT_K_CHOICES
    ]


def quant_gemv_triton(
    x2: torch.Tensor,  # [M, K], unit stride along the row
    w: PackedWeight,
    bias: torch.Tensor | None,
    config: dict,  # BLOCK_N, BLOCK_W, SPLIT_K, num_warps, num_stages
) -> torch.Tensor:
    """x2 @ dequantize(w)^T (+ bias) -> [M, N] in x2's dtype (M <= 4), split over K."""
    m, (n, kw) = x2.shape[0], w.qweight.shape
    assert x2.stride(-1) == 1 and 1 <= m <= MAX_M and w.bits in (4, 8)
    config = dict(config)
    block_n, block_w, split = config.pop("BLOCK_N"), config.pop("BLOCK_W"), config.pop("SPLIT_K")
    slice_ = triton.cdiv(triton.cdiv(kw, split), block_w) * block_w  # words, whole steps
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    part = torch.empty(split, m, n, dtype=torch.float32, device=x2.device) if split > 1 else out
    pdl = use_pdl(x2)
    # no masks: whole tiles of rows, no padded inputs, and every step whole (slices and K
    # in whole steps, so that a step lies wholly inside its slice or past its end)
    even = n % block_n == 0 and w.in_features == kw * 32 // w.bits and kw % block_w == 0
    _quant_gemv_kernel[(triton.cdiv(n, block_n), split)](
        x2, w.perm if w.perm is not None else w.qweight, w.qweight, w.scales,
        w.zeros if w.zeros is not None else w.scales, bias if bias is not None else w.scales,
        out, part, m, n, w.in_features, kw, w.scales.shape[1], x2.stride(0), out.stride(0),
        slice_, (1 << w.bits) - 1, 0x3F800000,
        BITS=w.bits, W=w.words, V=math.gcd(w.words, 4), HAS_ZEROS=w.zeros is not None,
        HAS_BIAS=bias is not None, HAS_PERM=w.perm is not None, EVEN=even, ROWS=m,
        BLOCK_N=block_n, BLOCK_W=block_w, PDL=pdl, **pdl_options(pdl), **config,
    )  # fmt: skip
    if split > 1:
        _split_k_sum_kernel[(triton.cdiv(n, SUM_BLOCK), m)](
            part, bias if bias is not None else part, out, n, out.stride(0),
            SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=SUM_BLOCK, PDL=pdl, num_warps=4,
            **pdl_options(pdl),
        )  # fmt: skip
    return out
