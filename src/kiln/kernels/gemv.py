"""Memory-bound matrix-vector products for decode (M <= 16 rows), with the op before fused in.

At batch 1..16 a Linear layer's cost is reading its weight once; cuBLAS reaches only part of
the copy bandwidth on the small-N projections, and the RMSNorm and SiLU-and-mul launches
between them cost as much again. Three entry points, each `<name>_ref` (plain torch),
`<name>_triton` and the dispatcher `<name>`:

- gemv(x, weight, bias):                      F.linear(x, weight, bias);
- rmsnorm_gemv(x, residual, norm_weight, eps, weight, bias):
                                              h = x + residual (or x), rmsnorm(h) -> Linear,
                                              returns (out, h);
- silu_mul_gemv(gate_up, weight, bias):       silu_and_mul(gate_up) -> Linear.

Two kernels. Up to RESIDENT_MAX_M rows (the engine's batch-1 decode), the resident-weight
kernel: each program loads its whole [BLOCK_N, K] weight slice (about 16K weights) in one go
*before* it waits for the previous kernel (programmatic dependent launch on Hopper: the
kernel is launched while the previous one runs, and `gdc_wait` holds back only the reads of
the activations), so the weight stream overlaps the previous kernel and the whole matrix is
in flight at once; then each row (whole: RMSNorm needs no second pass) is prepared and
multiplied. It beats cuBLAS plus separate norm / SiLU-mul kernels at batch 1 and loses by
batch 4 (numbers: notes/BENCHMARKS.md, "GEMV kernels").

Otherwise, the chunked kernel: one program per BLOCK_N rows of the weight ([N, K], row-major
as nn.Linear.weight), looping over K in BLOCK_K chunks (each a coalesced [BLOCK_N, BLOCK_K]
tile), with no split over K, so one launch and a deterministic order. Each chunk of the
activation [BLOCK_M, BLOCK_K] (rows >= M masked to zero) is built in the prologue, with the
rounding steps of the references (kiln.kernels.rmsnorm / silu_and_mul), then multiplied in
float32 (PRODUCT): by broadcast-multiply-and-sum (BLOCK_M = next power of two of M), or by
tl.dot with M padded to 16, as x @ w^T or (w @ x^T)^T. The RMSNorm variant first sums each
row's squares over the whole row (every program, from L2: the row is small), and program 0
alone writes h = x + residual.

Measured (notes/BENCHMARKS.md), the chunked kernel beats cuBLAS at M=1 only, and the SiLU
prologue with tl.dot is pathological: so the dispatchers use it at M=1 only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.kernels._triton import (
    gdc_launch_dependents,
    gdc_wait,
    pdl_options,
    tl,
    triton,
    use_pdl,
    use_triton,
)
from kiln.kernels.common import dot_options
from kiln.kernels.rmsnorm import rmsnorm, rmsnorm_ref
from kiln.kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref

MAX_M = 16
# Largest row count multiplied by broadcast-and-sum by default; above it, tl.dot.
MAX_BROADCAST_M = 4
# The dispatchers launch the kernels up to this many rows (cuBLAS was faster at M=8; M=2..4
# were not measured), F.linear and the separate kernels above it.
DISPATCH_MAX_M = 1
# The interpreter (CPU tests) uses small tiles so that tiny shapes cross chunk boundaries.
INTERPRETER_CONFIG = dict(BLOCK_N=16, BLOCK_K=64, num_warps=4, num_stages=1)

_PLAIN, _RMSNORM, _SILU_MUL = 0, 1, 2  # prologues
_BROADCAST, _DOT, _DOT_T = 0, 1, 2  # products: multiply-and-sum, x @ w^T, (w @ x^T)^T


# The resident-weight kernel (one program holds its whole weight slice): up to this many rows
# and this many (power-of-two padded) columns, about this many weight elements a program.
RESIDENT_MAX_M = 4
RESIDENT_MAX_K = 8192
RESIDENT_ELEMENTS = 16384


def resident_config(M: int, N: int, K: int, elements: int = RESIDENT_ELEMENTS) -> dict:
    """Settings for the resident-weight kernel: BLOCK_N rows of K (padded) columns a program,
    about `elements` weights (64 bf16 registers a thread at 4 warps for 16384)."""
    block_k = triton.next_power_of_2(K)
    block_n = max(1, min(elements // block_k, triton.next_power_of_2(N)))
    warps = 8 if block_n * block_k >= 32768 else 4
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=1, RESIDENT=True)


def default_config(M: int, N: int, K: int, *, silu_mul: bool = False) -> dict:
    """Launch settings for CUDA (from an H100 sweep at M=1 and M=8; see the module doc).

    M <= 4, broadcast-and-sum: 4-row weight slices (N=1024 gives 256 programs, about two per
    SM) and long chunks, 1024 columns at M=1 (512 above, the product tile grows with M), so
    that each program has 8 KiB of weights in flight; the loads of this path are not
    software-pipelined, so num_stages hardly matters. M > 4, tl.dot: 32-row slices where
    that still leaves 128 programs (N >= 4096), else 8, with 256- or 512-column chunks and
    3 stages; the SiLU-mul prologue instead keeps broadcast-and-sum (8 x 1024, 8 warps).
    Up to RESIDENT_MAX_M rows (and K <= RESIDENT_MAX_K) the resident-weight kernel instead.
    """
    if M <= RESIDENT_MAX_M and triton.next_power_of_2(K) <= RESIDENT_MAX_K:
        return resident_config(M, N, K)
    if M <= MAX_BROADCAST_M:
        block_k = min(1024 if M == 1 else 512, triton.next_power_of_2(K))
        return dict(BLOCK_N=4, BLOCK_K=block_k, num_warps=4, num_stages=2)
    if silu_mul:
        block_k = min(1024, triton.next_power_of_2(K))
        return dict(BLOCK_N=8, BLOCK_K=block_k, num_warps=8, num_stages=2, PRODUCT=_BROADCAST)
    if N >= 32 * 128:
        return dict(BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=3, PRODUCT=_DOT)
    return dict(BLOCK_N=8, BLOCK_K=512, num_warps=4, num_stages=3, PRODUCT=_DOT)


def sweep_configs() -> list[dict]:
    """Candidate launch settings for a benchmark sweep on the GPU (pass each as `config`,
    optionally with PRODUCT set: 0 broadcast-and-sum, 1 x @ w^T, 2 (w @ x^T)^T)."""
    return [
        dict(BLOCK_N=4, BLOCK_K=1024, num_warps=4, num_stages=2),
        dict(BLOCK_N=8, BLOCK_K=512, num_warps=4, num_stages=3),
        dict(BLOCK_N=8, BLOCK_K=1024, num_warps=4, num_stages=2),
        dict(BLOCK_N=8, BLOCK_K=1024, num_warps=8, num_stages=2),
        dict(BLOCK_N=8, BLOCK_K=2048, num_warps=8, num_stages=2),
        dict(BLOCK_N=16, BLOCK_K=256, num_warps=4, num_stages=4),
        dict(BLOCK_N=16, BLOCK_K=512, num_warps=4, num_stages=3),
        dict(BLOCK_N=16, BLOCK_K=1024, num_warps=8, num_stages=2),
        dict(BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=3),
        dict(BLOCK_N=32, BLOCK_K=512, num_warps=8, num_stages=3),
        dict(BLOCK_N=64, BLOCK_K=256, num_warps=8, num_stages=3),
    ]


# ---------------------------------------------------------------- references


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """Plain torch: F.linear(x, weight, bias)."""
    return F.linear(x, weight, bias)


def rmsnorm_gemv_ref(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: (F.linear(rmsnorm(x + residual), weight, bias), x + residual); without
    a residual, (F.linear(rmsnorm(x), weight, bias), x)."""
    if residual is None:
        normed, h = rmsnorm_ref(x, norm_weight, eps), x
    else:
        normed, h = rmsnorm_ref(x, norm_weight, eps, residual)
    return F.linear(normed, weight, bias), h


def silu_mul_gemv_ref(
    gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain torch: F.linear(silu(gate_up[..., :I]) * gate_up[..., I:], weight, bias)."""
    return F.linear(silu_and_mul_ref(gate_up), weight, bias)


# ---------------------------------------------------------------- kernel


@triton.jit
def activation_chunk(
    x_rows, r_rows, nw_ptr, rstd, cols, mask, K,
    PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    """The [BLOCK_M, BLOCK_K] chunk of the GEMV's left operand at `cols`, in x's dtype."""
    x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_last")
    if PROLOGUE == 1:  # RMSNorm: round h, normalize in fp32, round, times weight, round
        if HAS_RESIDUAL:
            r = tl.load(r_rows + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_last")
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        nw = tl.load(nw_ptr + cols, mask=cols < K, other=0.0, eviction_policy="evict_last")
        h = (x.to(tl.float32) * rstd[:, None]).to(x.dtype)
        x = (h.to(tl.float32) * nw.to(tl.float32)[None, :]).to(x.dtype)
    elif PROLOGUE == 2:  # SiLU-and-mul: x is the gate, the up half lies K columns on
        up = tl.load(x_rows + K + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_last")
        g = x.to(tl.float32)
        act = (g * tl.sigmoid(g)).to(x.dtype)
        x = (act.to(tl.float32) * up.to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def row_rstd(
    x_rows, r_rows, h_ptr, rows, row_mask, h_rows, K, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """1 / RMS of each row of h = x + residual (or x), over the whole row (from L2), with
    kiln.kernels.rmsnorm's rounding of h; rows below h_rows also store h (one program does)."""
    offs_k = tl.arange(0, BLOCK_K)
    sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    h_mask = rows[:, None] < h_rows
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs_k
        mask = row_mask[:, None] & (cols[None, :] < K)
        h = tl.load(x_rows + cols[None, :], mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(r_rows + cols[None, :], mask=mask, other=0.0)
            h = (h.to(tl.float32) + r.to(tl.float32)).to(h.dtype)
            tl.store(h_ptr + rows[:, None] * K + cols[None, :], h, mask=mask & h_mask)
        hf = h.to(tl.float32)
        sum_sq += tl.sum(hf * hf, axis=1)
    return tl.rsqrt(sum_sq / K + eps)


@triton.jit(do_not_specialize=["M", "stride_xm", "stride_rm", "stride_om"])
def _gemv_kernel(
    x_ptr, res_ptr, nw_ptr, w_ptr, b_ptr, out_ptr, h_ptr,
    M, stride_xm, stride_rm, stride_om, N, K, eps,
    PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, PRODUCT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < M
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    r_rows = res_ptr + rows[:, None].to(tl.int64) * stride_rm
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * K  # weight rows are contiguous

    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if PROLOGUE == 1:
        rstd = row_rstd(x_rows, r_rows, h_ptr, rows, row_mask, tl.where(pid == 0, M, 0), K, eps,
                        HAS_RESIDUAL, BLOCK_M, BLOCK_K)  # fmt: skip

    if PRODUCT == 2:  # transposed: acc[n, m]
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs_k
        if EVEN_K:
            x_mask = row_mask[:, None]
            if EVEN_N:
                w = tl.load(w_rows + cols[None, :], eviction_policy="evict_first")
            else:
                w_mask = offs_n[:, None] < N
                w = tl.load(w_rows + cols[None, :], mask=w_mask, other=0.0,
                            eviction_policy="evict_first")  # fmt: skip
        else:
            x_mask = row_mask[:, None] & (cols[None, :] < K)
            w_mask = (offs_n[:, None] < N) & (cols[None, :] < K)
            w = tl.load(w_rows + cols[None, :], mask=w_mask, other=0.0,
                        eviction_policy="evict_first")  # fmt: skip
        a = activation_chunk(x_rows, r_rows, nw_ptr, rstd, cols, x_mask, K,
                              PROLOGUE, HAS_RESIDUAL)  # fmt: skip
        if PRODUCT != 0:
            if DOT_UPCAST:  # the interpreter multiplies bfloat16 tiles wrongly
                a, w = a.to(tl.float32), w.to(tl.float32)
            if PRODUCT == 1:
                acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(w, tl.trans(a), acc, input_precision=DOT_PRECISION)
        elif BLOCK_M == 1:
            prod = w.to(tl.float32) * a.to(tl.float32)  # [BLOCK_N, BLOCK_K]
            acc += tl.sum(prod, axis=1)[None, :]
        else:
            prod = a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
            acc += tl.sum(prod, axis=2)

    if PRODUCT == 2:
        acc = tl.trans(acc)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    out_mask = row_mask[:, None] & (offs_n[None, :] < N)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["M", "stride_xm", "stride_rm", "stride_om"])
def _gemv_resident_kernel(
    x_ptr, res_ptr, nw_ptr, w_ptr, b_ptr, out_ptr, h_ptr,
    M, stride_xm, stride_rm, stride_om, N, K, eps,
    PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Small-M GEMV whose program loads its whole [BLOCK_N, K] weight slice at once, before
    it waits for the previous kernel (PDL): the weights do not depend on it, so with
    programmatic dependent launch their reads overlap the previous kernel's tail, and with
    the grid resident on the SMs the whole matrix is in flight at once. Then each of the M
    rows (whole, so that RMSNorm needs no second pass) is prepared and multiplied."""
    if PDL:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    k_ok = cols < K
    w = tl.load(  # kept in its dtype (half the registers of float32) until the product
        w_ptr + offs_n[:, None].to(tl.int64) * K + cols[None, :],
        mask=(offs_n[:, None] < N) & k_ok[None, :],
        other=0.0,
        eviction_policy="evict_first",
    )
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    if PROLOGUE == 1:
        nw = tl.load(nw_ptr + cols, mask=k_ok, other=0.0).to(tl.float32)
    if PDL:
        gdc_wait()
    for m in tl.static_range(BLOCK_M):
        if m < M:
            x = tl.load(x_ptr + m * stride_xm + cols, mask=k_ok, other=0.0)
            if PROLOGUE == 1:  # the rounding steps of kiln.kernels.rmsnorm
                if HAS_RESIDUAL:
                    r = tl.load(res_ptr + m * stride_rm + cols, mask=k_ok, other=0.0)
                    x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
                    if pid == 0:
                        tl.store(h_ptr + m * K + cols, x, mask=k_ok)
                xf = x.to(tl.float32)
                rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / K + eps)
                normed = (xf * rstd).to(x.dtype)
                x = (normed.to(tl.float32) * nw).to(x.dtype)
            elif PROLOGUE == 2:  # SiLU-and-mul: x is the gate, the up half lies K columns on
                up = tl.load(x_ptr + m * stride_xm + K + cols, mask=k_ok, other=0.0)
                g = x.to(tl.float32)
                act = (g * tl.sigmoid(g)).to(x.dtype)
                x = (act.to(tl.float32) * up.to(tl.float32)).to(x.dtype)
            acc = tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)  # [BLOCK_N]
            if HAS_BIAS:
                acc += bias
            out_ptrs = out_ptr + m * stride_om + offs_n
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=offs_n < N)


def _launch(
    prologue: int,
    x2: torch.Tensor,  # [M, K] (or [M, 2K] gate_up), unit stride along the row
    res2: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    h2: torch.Tensor | None,
    config: dict | None,
) -> torch.Tensor:
    m = x2.shape[0]
    n, k = weight.shape
    assert 1 <= m <= MAX_M, f"the GEMV kernels take 1..{MAX_M} rows, got {m}"
    assert x2.stride(-1) == 1 and weight.is_contiguous()
    assert weight.dtype == x2.dtype, f"weight {weight.dtype} != activations {x2.dtype}"
    if bias is not None:
        assert bias.shape == (n,) and bias.is_contiguous()
    if config is None:
        silu_mul = prologue == _SILU_MUL
        config = default_config(m, n, k, silu_mul=silu_mul) if x2.is_cuda else INTERPRETER_CONFIG
    config = dict(config)
    block_n, block_k = config.pop("BLOCK_N"), config.pop("BLOCK_K")
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    if config.pop("RESIDENT", False):
        assert block_k >= k, f"the resident kernel takes whole rows: BLOCK_K {block_k} < K {k}"
        pdl = use_pdl(x2)
        config.update(pdl_options(pdl))
        _gemv_resident_kernel[(triton.cdiv(n, block_n),)](
            x2, res2 if res2 is not None else x2,
            norm_weight if norm_weight is not None else x2,
            weight, bias if bias is not None else weight, out, h2 if h2 is not None else out,
            m, x2.stride(0), res2.stride(0) if res2 is not None else 0, out.stride(0), n, k, eps,
            PROLOGUE=prologue, HAS_RESIDUAL=res2 is not None, HAS_BIAS=bias is not None,
            BLOCK_M=triton.next_power_of_2(m), BLOCK_N=block_n, BLOCK_K=block_k, PDL=pdl,
            **config,
        )  # fmt: skip
        return out
    product = config.pop("PRODUCT", _DOT if m > MAX_BROADCAST_M else _BROADCAST)
    block_m = triton.next_power_of_2(m) if product == _BROADCAST else 16
    dots = dot_options(x2)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x2, res2 if res2 is not None else x2,
        norm_weight if norm_weight is not None else x2,
        weight, bias if bias is not None else weight, out, h2 if h2 is not None else out,
        m, x2.stride(0), res2.stride(0) if res2 is not None else 0, out.stride(0), n, k, eps,
        PROLOGUE=prologue, HAS_RESIDUAL=res2 is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_N=n % block_n == 0, EVEN_K=k % block_k == 0, PRODUCT=product,
        DOT_PRECISION=dots["DOT_PRECISION"], DOT_UPCAST=dots["DOT_UPCAST"],
        **config,
    )  # fmt: skip
    return out


def gemv_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """Triton F.linear for 1..16 rows: x [..., K], weight [N, K], bias [N] -> [..., N]."""
    x2 = x.reshape(-1, x.shape[-1])
    assert x2.shape[1] == weight.shape[1], f"x has {x2.shape[1]} features, weight {weight.shape}"
    out = _launch(_PLAIN, x2, None, None, 0.0, weight, bias, None, config)
    return out.view(*x.shape[:-1], weight.shape[0])


def rmsnorm_gemv_triton(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton RMSNorm (after the residual add, if any) then Linear, in one launch; same
    contract as rmsnorm_gemv_ref."""
    hidden = x.shape[-1]
    assert weight.shape[1] == hidden and norm_weight.shape == (hidden,)
    assert norm_weight.dtype == x.dtype and norm_weight.is_contiguous()
    x2 = x.reshape(-1, hidden)
    res2 = h2 = None
    h = x
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype
        res2 = residual.reshape(-1, hidden)
        assert res2.stride(-1) == 1
        h = torch.empty_like(x, memory_format=torch.contiguous_format)
        h2 = h.view(-1, hidden)
    out = _launch(_RMSNORM, x2, res2, norm_weight, eps, weight, bias, h2, config)
    return out.view(*x.shape[:-1], weight.shape[0]), h


def silu_mul_gemv_triton(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """Triton silu_and_mul then Linear, in one launch; same contract as silu_mul_gemv_ref."""
    two_i = gate_up.shape[-1]
    assert two_i == 2 * weight.shape[1], f"gate_up has {two_i} columns, weight {weight.shape}"
    x2 = gate_up.reshape(-1, two_i)
    out = _launch(_SILU_MUL, x2, None, None, 0.0, weight, bias, None, config)
    return out.view(*gate_up.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------- dispatchers


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """F.linear: the Triton GEMV on CUDA for up to DISPATCH_MAX_M rows, torch otherwise."""
    if use_triton(x) and 1 <= _rows(x) <= DISPATCH_MAX_M:
        return gemv_triton(x, weight, bias)
    return gemv_ref(x, weight, bias)


def rmsnorm_gemv(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm (+ residual add) then Linear: one Triton launch on CUDA for up to
    DISPATCH_MAX_M rows, else kiln.kernels.rmsnorm then F.linear."""
    if use_triton(x) and 1 <= _rows(x) <= DISPATCH_MAX_M:
        return rmsnorm_gemv_triton(x, residual, norm_weight, eps, weight, bias)
    if residual is None:
        return F.linear(rmsnorm(x, norm_weight, eps), weight, bias), x
    normed, h = rmsnorm(x, norm_weight, eps, residual)
    return F.linear(normed, weight, bias), h


def silu_mul_gemv(
    gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """silu_and_mul then Linear: one Triton launch on CUDA for up to DISPATCH_MAX_M rows,
    else kiln.kernels.silu_and_mul then F.linear."""
    if use_triton(gate_up) and 1 <= _rows(gate_up) <= DISPATCH_MAX_M:
        return silu_mul_gemv_triton(gate_up, weight, bias)
    return F.linear(silu_and_mul(gate_up), weight, bias)
