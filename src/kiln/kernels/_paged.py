"""Pieces shared by the two paged-attention kernels and their references.

A sequence's K/V live in the paged cache [num_blocks, block_size, num_kv_heads, head_dim]:
its token t sits in block `block_table[t // block_size]` at offset `t % block_size`.
"""

from __future__ import annotations

import torch

from kiln.kernels._triton import assert_head_dim, tl, triton
from kiln.kernels.causal_attention import causal_attention

LOG2E = 1.4426950408889634  # the kernels use exp2, so scores are scaled by log2(e)


def gather_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `length` tokens of one sequence's K and V: two [length, Hkv, D] tensors."""
    blocks = block_table[: -(-length // k_cache.shape[1])].long()
    return k_cache[blocks].flatten(0, 1)[:length], v_cache[blocks].flatten(0, 1)[:length]


def attend_paged_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_len: int,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """One sequence's queries q [T, Hq, D], the last T of its context_len tokens -> [T, Hq, D]."""
    k, v = gather_kv(k_cache, v_cache, block_table, context_len)
    q_offset = context_len - q.shape[0]
    return causal_attention(q[None], k[None], v[None], scale, q_offset, sliding_window)[0]


def check_paged_args(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor
) -> None:
    """Assert the shapes and layouts the paged kernels rely on."""
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = k_cache.shape[2]
    assert_head_dim(head_dim)
    assert num_heads % num_kv_heads == 0, f"{num_heads} q heads over {num_kv_heads} kv heads"
    assert k_cache.shape[3] == head_dim and v_cache.shape == k_cache.shape
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    assert q.stride(-1) == 1 and block_tables.stride(-1) == 1


@triton.jit
def kv_tile_offsets(block_table_ptr, toks, valid, block_size, stride_block, stride_off):
    """Element offsets into the cache of the tokens `toks` (one kv head's row start each)."""
    page = tl.load(block_table_ptr + toks // block_size, mask=valid, other=0).to(tl.int64)
    return page * stride_block + (toks % block_size).to(tl.int64) * stride_off


@triton.jit
def online_softmax_step(
    q, k, v, valid, acc, m, l, qk_scale, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr
):  # fmt: skip
    """Fold one K/V tile into the running (acc, max, sum) of flash attention (base-2 scores).

    q [M, D], k and v [N, D], valid [M, N]; a row with nothing valid so far keeps m = -inf.
    """
    if DOT_UPCAST:
        q, k, v = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [M, N]
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m - m_safe)
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l


def dot_options(q: torch.Tensor) -> dict:
    """The kernels' tl.dot settings: exact float32 products for float32 inputs (tests), tensor
    cores for 16-bit ones; in the CPU interpreter, bfloat16 goes through float32, because the
    interpreter multiplies bfloat16 tiles as raw 16-bit integers (Triton 3.9)."""
    return dict(
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        DOT_UPCAST=not q.is_cuda and q.dtype == torch.bfloat16,
    )
