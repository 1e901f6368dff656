"""Block-sparse attention: Longformer (sliding window + global tokens) and BigBird (random +
window + global) patterns as block layouts, and Triton flash-attention kernels, forward and
backward, that visit only the non-empty blocks.

A layout is a bool [num_blocks, num_blocks] matrix over BLOCK-token blocks: query block i may
attend key block j. With `causal` the token mask is also k_pos <= q_pos (so the diagonal
blocks are half empty and the upper triangle empty). The reference is dense attention under
the expanded token mask (SDPA: differentiable). The forward kernel walks each query block's
key blocks from a CSR list (`layout_to_csr`), with flash attention's online softmax; the
backward (FlashAttention-2's) walks each key block's query blocks for dK and dV (the CSR of
the transposed layout) and each query block's key blocks for dQ. Time grows with the number
of non-empty blocks, memory with T: neither builds a [T, T] mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.errors import ConfigError
from kiln.kernels._triton import tl, triton, use_triton
from kiln.kernels.common import LOG2E, dot_options, online_softmax_step


def longformer_layout(
    num_blocks: int, window: int, global_blocks: int, causal: bool = True
) -> torch.Tensor:
    """Key blocks within `window` blocks of the query block (each side, or before it when
    causal), plus the first `global_blocks` blocks: every query attends to them and they
    attend to every key (before them, when causal)."""
    i = torch.arange(num_blocks)[:, None]
    j = torch.arange(num_blocks)[None, :]
    layout = ((i - j).abs() <= window) | (j < global_blocks) | (i < global_blocks)
    return layout & (j <= i) if causal else layout


def bigbird_layout(
    num_blocks: int,
    window: int,
    global_blocks: int,
    num_random: int,
    seed: int = 0,
    causal: bool = True,
) -> torch.Tensor:
    """Longformer's layout plus `num_random` more key blocks a query block, drawn (with
    `seed`) among those it may see and does not yet."""
    layout = longformer_layout(num_blocks, window, global_blocks, causal)
    g = torch.Generator().manual_seed(seed)
    for i in range(num_blocks):
        free = (~layout[i]).nonzero().flatten()
        if causal:
            free = free[free < i]
        pick = free[torch.randperm(free.numel(), generator=g)[:num_random]]
        layout[i, pick] = True
    return layout


def layout_mask(layout: torch.Tensor, block: int, seq_len: int, causal: bool) -> torch.Tensor:
    """The token mask [T, T] (True: attend) of a block layout."""
    pos = torch.arange(seq_len, device=layout.device)
    mask = layout[pos[:, None] // block, pos[None, :] // block]
    return mask & (pos[None, :] <= pos[:, None]) if causal else mask


def layout_to_csr(layout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cols [num_blocks, max_nnz] int32: each query block's key blocks ascending, padded;
    nnz [num_blocks] int32)."""
    nnz = layout.sum(1).to(torch.int32)
    order = torch.argsort((~layout).to(torch.int8), dim=1, stable=True)  # True columns first
    cols = order[:, : max(int(nnz.max()), 1)].to(torch.int32)
    return cols.contiguous(), nnz


def block_sparse_attention_ref(q, k, v, layout, block: int, scale: float, causal: bool = True):
    """Dense attention under the layout's token mask. q [B, T, Hq, D], k/v [B, T, Hkv, D]."""
    mask = layout_mask(layout.to(q.device), block, q.shape[1], causal)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


@triton.jit
def _load_rows(ptr, off, rows, row_ok, stride_t, D: tl.constexpr):
    """The [BLOCK, D] tile of one head's rows `rows` (zeros past the end) at ptr + off."""
    d = tl.arange(0, D)
    return tl.load(
        ptr + off + rows[:, None] * stride_t + d[None, :], mask=row_ok[:, None], other=0.0
    )


@triton.jit
def _key_block(
    k_ptr, v_ptr, kv_off, cols_ptr, qb, i, max_nnz, rows, row_ok, T, stride_kt,
    D: tl.constexpr, BLOCK: tl.constexpr, CAUSAL: tl.constexpr,
):  # fmt: skip
    """Query block qb's i-th key block: its K and V tiles and the [BLOCK, BLOCK] mask of the
    (query row, key column) pairs that attend."""
    cols = tl.load(cols_ptr + qb * max_nnz + i) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < T
    k = _load_rows(k_ptr, kv_off, cols, col_ok, stride_kt, D)
    v = _load_rows(v_ptr, kv_off, cols, col_ok, stride_kt, D)
    valid = row_ok[:, None] & col_ok[None, :]
    if CAUSAL:
        valid = valid & (cols[None, :] <= rows[:, None])
    return k, v, valid


@triton.jit
def _block_sparse_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cols_ptr, nnz_ptr,
    T, num_heads, max_nnz, qk_scale,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_ob, stride_ot, stride_oh,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
    STORE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    """One query block of one (batch, head): its non-empty key blocks only."""
    qb, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // num_heads, bh % num_heads
    rows = qb * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < T
    q = _load_rows(q_ptr, b.to(tl.int64) * stride_qb + h * stride_qh, rows, row_ok, stride_qt, D)
    kv_off = b.to(tl.int64) * stride_kb + (h // GROUP) * stride_kh
    acc = tl.zeros((BLOCK, D), dtype=tl.float32)
    m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, tl.load(nnz_ptr + qb)):
        k, v, valid = _key_block(
            k_ptr, v_ptr, kv_off, cols_ptr, qb, i, max_nnz, rows, row_ok, T, stride_kt,
            D, BLOCK, CAUSAL,
        )  # fmt: skip
        acc, m, l = online_softmax_step(
            q, k, v, valid, acc, m, l, qk_scale, DOT_PRECISION, DOT_UPCAST
        )
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    o_off = b.to(tl.int64) * stride_ob + h * stride_oh
    d = tl.arange(0, D)
    tl.store(o_ptr + o_off + rows[:, None] * stride_ot + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])  # fmt: skip
    if STORE_LSE:  # ln of the row's sum of exp(scale q.k); +inf for a row that sees no key
        lse = (m + tl.log2(tl.where(l > 0, l, 1.0))) * 0.6931471805599453
        lse = tl.where(l > 0, lse, float("inf"))
        tl.store(lse_ptr + bh.to(tl.int64) * T + rows, lse, mask=row_ok)


def _num_warps(block: int) -> int:
    return 4 if block <= 64 else 8


def _forward(q, k, v, layout, block: int, scale: float, causal: bool, with_lse: bool):
    """(out like q, lse [B, Hq, T] float32 or None: its row's log-sum-exp when with_lse)."""
    batch, seq_len, num_heads, head_dim = q.shape
    assert k.shape[1] == seq_len and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    assert k.stride() == v.stride() and head_dim >= 16 and head_dim & (head_dim - 1) == 0
    assert layout.shape[0] * block >= seq_len, "the layout covers fewer tokens than the input"
    cols, nnz = (t.to(q.device) for t in layout_to_csr(layout))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, num_heads, seq_len, device=q.device) if with_lse else None
    grid = (triton.cdiv(seq_len, block), batch * num_heads)
    _block_sparse_attention_kernel[grid](
        q, k, v, out, lse if with_lse else out, cols, nnz,
        seq_len, num_heads, cols.shape[1], scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        GROUP=num_heads // k.shape[2], CAUSAL=causal, BLOCK=block, D=head_dim,
        STORE_LSE=with_lse, num_warps=_num_warps(block), **dot_options(q),
    )  # fmt: skip
    return out, lse


def block_sparse_attention_triton(q, k, v, layout, block: int, scale: float, causal: bool = True):
    """Triton block_sparse_attention (forward only); same contract as
    block_sparse_attention_ref."""
    return _forward(q, k, v, layout, block, scale, causal, with_lse=False)[0]


# ------------------------------------------------------------------------------- backward
# FlashAttention-2's: with P = exp(scale Q K^T - lse) recomputed block by block,
# dV = P^T dO, dS = P * (dO V^T - delta) with delta = rowsum(dO * O), dQ = scale dS K and
# dK = scale dS^T Q; a key block's dK and dV come from the query blocks that attend it
# (the transposed layout's CSR), a query block's dQ from its key blocks (the forward's CSR).


@triton.jit
def _delta_kernel(
    o_ptr, do_ptr, delta_ptr, T, num_heads,
    stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh,
    BLOCK: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(dO * O) [B, H, T] float32 of one block of rows of one (batch, head)."""
    qb, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // num_heads, bh % num_heads
    rows = qb * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < T
    o_off = b.to(tl.int64) * stride_ob + h * stride_oh
    do_off = b.to(tl.int64) * stride_dob + h * stride_doh
    o = _load_rows(o_ptr, o_off, rows, row_ok, stride_ot, D).to(tl.float32)
    do = _load_rows(do_ptr, do_off, rows, row_ok, stride_dot, D).to(tl.float32)
    tl.store(delta_ptr + bh.to(tl.int64) * T + rows, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _probs_and_score_grads(a, b, c, e, lse, delta, valid, qk_scale, DOT_PRECISION: tl.constexpr):
    """P = exp(scale a b^T - lse) and dS = P * (c e^T - delta) on the `valid` entries: with
    (a, b, c, e) = (q, k, dO, v) and lse, delta [M, 1], the [M, N] query-major tiles; with
    (k, q, v, dO) and lse, delta [1, M], their transposes."""
    s = tl.dot(a, tl.trans(b), input_precision=DOT_PRECISION) * qk_scale
    p = tl.where(valid, tl.exp2(s - lse * 1.4426950408889634), 0.0)  # s is log2-scaled
    dp = tl.dot(c, tl.trans(e), input_precision=DOT_PRECISION)
    return p, p * (dp - delta)


@triton.jit
def _dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, rows_ptr, nnz_ptr,
    T, num_kv_heads, max_nnz, qk_scale, scale,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_dob, stride_dot, stride_doh, stride_dkb, stride_dkt, stride_dkh,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    """dK, dV of one key block of one (batch, kv head): summed over the query blocks that
    attend it and over the kv head's GROUP query heads."""
    kb, bh = tl.program_id(0), tl.program_id(1)
    b, hk = bh // num_kv_heads, bh % num_kv_heads
    cols = kb * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < T
    kv_off = b.to(tl.int64) * stride_kb + hk * stride_kh
    k = _load_rows(k_ptr, kv_off, cols, col_ok, stride_kt, D)
    v = _load_rows(v_ptr, kv_off, cols, col_ok, stride_kt, D)
    if DOT_UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    dk = tl.zeros((BLOCK, D), dtype=tl.float32)
    dv = tl.zeros((BLOCK, D), dtype=tl.float32)
    for i in range(0, tl.load(nnz_ptr + kb)):
        qb = tl.load(rows_ptr + kb * max_nnz + i)
        rows = qb * BLOCK + tl.arange(0, BLOCK)
        row_ok = rows < T
        valid = col_ok[:, None] & row_ok[None, :]  # [keys, queries]
        if CAUSAL:
            valid = valid & (cols[:, None] <= rows[None, :])
        for g in range(GROUP):
            h = hk * GROUP + g
            q = _load_rows(q_ptr, b.to(tl.int64) * stride_qb + h * stride_qh, rows, row_ok,
                           stride_qt, D)  # fmt: skip
            do = _load_rows(do_ptr, b.to(tl.int64) * stride_dob + h * stride_doh, rows, row_ok,
                            stride_dot, D)  # fmt: skip
            stat = (b * num_kv_heads * GROUP + h).to(tl.int64) * T + rows
            lse = tl.load(lse_ptr + stat, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_ptr + stat, mask=row_ok, other=0.0)
            if DOT_UPCAST:
                q, do = q.to(tl.float32), do.to(tl.float32)
            p_t, ds_t = _probs_and_score_grads(
                k, q, v, do, lse[None, :], delta[None, :], valid, qk_scale, DOT_PRECISION
            )
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    d = tl.arange(0, D)
    out = b.to(tl.int64) * stride_dkb + hk * stride_dkh + cols[:, None] * stride_dkt + d[None, :]
    tl.store(dk_ptr + out, (dk * scale).to(dk_ptr.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cols_ptr, nnz_ptr,
    T, num_heads, max_nnz, qk_scale, scale,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_dob, stride_dot, stride_doh,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    """dQ of one query block of one (batch, head), over its non-empty key blocks; dq has
    dO's strides."""
    qb, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // num_heads, bh % num_heads
    rows = qb * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < T
    do_off = b.to(tl.int64) * stride_dob + h * stride_doh
    q = _load_rows(q_ptr, b.to(tl.int64) * stride_qb + h * stride_qh, rows, row_ok, stride_qt, D)
    do = _load_rows(do_ptr, do_off, rows, row_ok, stride_dot, D)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * T + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_ptr + bh.to(tl.int64) * T + rows, mask=row_ok, other=0.0)
    if DOT_UPCAST:
        q, do = q.to(tl.float32), do.to(tl.float32)
    kv_off = b.to(tl.int64) * stride_kb + (h // GROUP) * stride_kh
    dq = tl.zeros((BLOCK, D), dtype=tl.float32)
    for i in range(0, tl.load(nnz_ptr + qb)):
        k, v, valid = _key_block(
            k_ptr, v_ptr, kv_off, cols_ptr, qb, i, max_nnz, rows, row_ok, T, stride_kt,
            D, BLOCK, CAUSAL,
        )  # fmt: skip
        if DOT_UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        _, ds = _probs_and_score_grads(
            q, k, do, v, lse[:, None], delta[:, None], valid, qk_scale, DOT_PRECISION
        )
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    d = tl.arange(0, D)
    tl.store(dq_ptr + do_off + rows[:, None] * stride_dot + d[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])  # fmt: skip


def _backward(do, q, k, v, out, lse, layout, block: int, scale: float, causal: bool):
    """(dq, dk, dv) of the block-sparse attention that gave `out` and `lse` (_forward)."""
    batch, seq_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    do = do.contiguous()  # autograd may hand an expanded or transposed one
    delta = torch.empty_like(lse)  # [B, Hq, T]
    dq = torch.empty_like(do)  # dO's strides
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty_like(dk)
    cols, nnz = (t.to(q.device) for t in layout_to_csr(layout))
    rows, rows_nnz = (t.to(q.device) for t in layout_to_csr(layout.T))  # key block -> queries
    num_blocks = triton.cdiv(seq_len, block)
    strides = (
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
    )  # fmt: skip
    common = dict(
        GROUP=num_heads // num_kv_heads, CAUSAL=causal, BLOCK=block, D=head_dim,
        num_warps=_num_warps(block), **dot_options(q),
    )  # fmt: skip
    _delta_kernel[(num_blocks, batch * num_heads)](
        out, do, delta, seq_len, num_heads, out.stride(0), out.stride(1), out.stride(2),
        *strides[6:], BLOCK=block, D=head_dim,
    )  # fmt: skip
    _dkdv_kernel[(num_blocks, batch * num_kv_heads)](
        q, k, v, do, lse, delta, dk, dv, rows, rows_nnz,
        seq_len, num_kv_heads, rows.shape[1], scale * LOG2E, scale,
        *strides, dk.stride(0), dk.stride(1), dk.stride(2), **common,
    )  # fmt: skip
    _dq_kernel[(num_blocks, batch * num_heads)](
        q, k, v, do, lse, delta, dq, cols, nnz,
        seq_len, num_heads, cols.shape[1], scale * LOG2E, scale, *strides, **common,
    )  # fmt: skip
    return dq, dk, dv


class BlockSparseAttentionFn(torch.autograd.Function):
    """Block-sparse attention with a Triton forward and backward (FlashAttention-2's): it
    saves the output and each row's log-sum-exp, O(T) memory, and recomputes the
    probabilities block by block."""

    @staticmethod
    def forward(ctx, q, k, v, layout, block: int, scale: float, causal: bool):
        out, lse = _forward(q, k, v, layout, block, scale, causal, with_lse=True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (layout, block, scale, causal)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        return *_backward(do, q, k, v, out, lse, *ctx.args), None, None, None, None


def block_sparse_attention(q, k, v, layout, block: int, scale: float, causal: bool = True):
    """Block-sparse attention, differentiable: the Triton kernels where use_triton(q) (with
    the backward only when a gradient is wanted), the masked dense reference otherwise."""
    if not use_triton(q):
        return block_sparse_attention_ref(q, k, v, layout, block, scale, causal)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return BlockSparseAttentionFn.apply(q, k, v, layout, block, scale, causal)
    return block_sparse_attention_triton(q, k, v, layout, block, scale, causal)


class BlockSparseAttention:
    """An attention backend (kiln.model.attention) for training and prefill under a
    Longformer or BigBird layout: the Triton kernels on CUDA (forward and, under autograd,
    backward), the masked dense reference otherwise (block_sparse_attention).

    `make_layout(num_blocks) -> layout` builds the layout for a sequence length (cached),
    e.g. functools.partial(bigbird_layout, window=3, global_blocks=2, num_random=3)."""

    def __init__(self, make_layout, block: int = 64, causal: bool = True):
        self.make_layout, self.block, self.causal = make_layout, block, causal
        self._layouts: dict[int, torch.Tensor] = {}

    def layout(self, seq_len: int) -> torch.Tensor:
        n = triton.cdiv(seq_len, self.block)
        if n not in self._layouts:
            self._layouts[n] = self.make_layout(n)
        return self._layouts[n]

    def attend(self, layer_idx, q, k, v, scale, sliding_window):
        if sliding_window is not None:
            raise ConfigError("block-sparse attention replaces the sliding window; got both")
        layout = self.layout(q.shape[1])
        return block_sparse_attention(q, k, v, layout, self.block, scale, self.causal)
