"""Block-sparse attention: Longformer (sliding window + global tokens) and BigBird (random +
window + global) patterns as block layouts, and a Triton flash-attention kernel that visits
only a query block's non-empty key blocks.

A layout is a bool [num_blocks, num_blocks] matrix over BLOCK-token blocks: query block i may
attend key block j. With `causal` the token mask is also k_pos <= q_pos (so the diagonal
blocks are half empty and the upper triangle empty). The reference is dense attention under
the expanded token mask (SDPA: differentiable, the training path); the kernel walks each query
block's key blocks from a CSR list (`layout_to_csr`), with flash attention's online softmax,
so its time grows with the number of non-empty blocks and it never builds a [T, T] mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.errors import ConfigError
from kiln.kernels._triton import tl, triton, use_triton
from kiln.kernels.common import dot_options, online_softmax_step


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
def _block_sparse_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, cols_ptr, nnz_ptr,
    T, num_heads, max_nnz, qk_scale,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_ob, stride_ot, stride_oh,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    """One query block of one (batch, head): its non-empty key blocks only."""
    qb = tl.program_id(0)
    b = tl.program_id(1) // num_heads
    h = tl.program_id(1) % num_heads
    d = tl.arange(0, D)
    rows = qb * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < T
    q_off = b.to(tl.int64) * stride_qb + h * stride_qh
    q = tl.load(q_ptr + q_off + rows[:, None] * stride_qt + d[None, :], mask=row_ok[:, None])
    kv_off = b.to(tl.int64) * stride_kb + (h // GROUP) * stride_kh
    acc = tl.zeros((BLOCK, D), dtype=tl.float32)
    m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, tl.load(nnz_ptr + qb)):
        kb = tl.load(cols_ptr + qb * max_nnz + i)
        cols = kb * BLOCK + tl.arange(0, BLOCK)
        col_ok = cols < T
        ptrs = kv_off + cols[:, None] * stride_kt + d[None, :]
        k = tl.load(k_ptr + ptrs, mask=col_ok[:, None], other=0.0)
        v = tl.load(v_ptr + ptrs, mask=col_ok[:, None], other=0.0)
        valid = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None])
        acc, m, l = online_softmax_step(
            q, k, v, valid, acc, m, l, qk_scale, DOT_PRECISION, DOT_UPCAST
        )
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    o_off = b.to(tl.int64) * stride_ob + h * stride_oh
    tl.store(o_ptr + o_off + rows[:, None] * stride_ot + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])  # fmt: skip


def block_sparse_attention_triton(q, k, v, layout, block: int, scale: float, causal: bool = True):
    """Triton block_sparse_attention; same contract as block_sparse_attention_ref."""
    batch, seq_len, num_heads, head_dim = q.shape
    assert k.shape[1] == seq_len and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    assert k.stride() == v.stride() and head_dim >= 16 and head_dim & (head_dim - 1) == 0
    assert layout.shape[0] * block >= seq_len, "the layout covers fewer tokens than the input"
    cols, nnz = layout_to_csr(layout)
    cols, nnz = cols.to(q.device), nnz.to(q.device)
    out = torch.empty_like(q)
    grid = (triton.cdiv(seq_len, block), batch * num_heads)
    _block_sparse_attention_kernel[grid](
        q, k, v, out, cols, nnz,
        seq_len, num_heads, cols.shape[1], scale * 1.4426950408889634,  # log2(e): exp2 scores
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        GROUP=num_heads // k.shape[2], CAUSAL=causal, BLOCK=block, D=head_dim,
        num_warps=4 if block <= 64 else 8, **dot_options(q),
    )  # fmt: skip
    return out


class BlockSparseAttention:
    """An attention backend (kiln.model.attention) for training and prefill under a
    Longformer or BigBird layout: the Triton kernel on CUDA without gradients (prefill), the
    masked dense reference otherwise (training backpropagates through SDPA).

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
        if use_triton(q) and not torch.is_grad_enabled():
            return block_sparse_attention_triton(q, k, v, layout, self.block, scale, self.causal)
        return block_sparse_attention_ref(q, k, v, layout, self.block, scale, self.causal)
