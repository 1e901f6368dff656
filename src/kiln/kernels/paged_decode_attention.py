"""Paged decode attention: one new query per sequence against its cached K/V.

Each program takes one (sequence, kv head, split): the GROUP = Hq / Hkv query heads that share
the kv head ride together as the rows of one tile, so every K/V tile is loaded once for all of
them. For long contexts and small batches the context is cut into `num_splits` pieces
(flash-decoding); each piece writes a partial output and its log-sum-exp, and a second kernel
merges them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.kernels._paged import (
    LOG2E,
    check_paged_args,
    dot_options,
    kv_tile_offsets,
    online_softmax_step,
)
from kiln.kernels._triton import num_sms, tl, triton, use_triton

MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 64
# Launch settings on CUDA (benchmarks/bench_kernels.py sweeps them); the interpreter uses
# 16-token tiles so that tiny tests still cross tile boundaries.
CUDA_CONFIG = dict(BLOCK_N=64, num_warps=4, num_stages=2)
INTERPRETER_CONFIG = dict(BLOCK_N=16, num_warps=4, num_stages=1)


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Plain torch: q [B, Hq, D] at position context_lens[b] - 1, in one masked SDPA over
    every sequence's gathered (padded) pages. Context length 0 gives zeros.

    num_splits only shapes the Triton kernel's work; the reference ignores it.
    """
    max_ctx = int(context_lens.max()) if q.shape[0] else 0
    if max_ctx == 0:
        return torch.zeros_like(q)
    tables = block_tables[:, : -(-max_ctx // k_cache.shape[1])].long()  # padding is masked
    keys = k_cache[tables].flatten(1, 2)[:, :max_ctx]  # [B, max_ctx, Hkv, D]
    values = v_cache[tables].flatten(1, 2)[:, :max_ctx]
    k_pos = torch.arange(max_ctx, device=q.device)[None, :]
    q_pos = context_lens[:, None].long() - 1
    mask = k_pos <= q_pos  # [B, max_ctx]
    if sliding_window is not None:
        mask &= q_pos - k_pos < sliding_window
    out = F.scaled_dot_product_attention(
        q[:, :, None],  # [B, Hq, 1, D]
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=q.shape[1] != k_cache.shape[2],
    )[:, :, 0]
    return out.masked_fill(q_pos[:, :, None] < 0, 0.0)


# Arguments that change from step to step are not value-specialized: Triton would otherwise
# compile a new variant, mid-serving, when an int happens to be 1 or a multiple of 16, or when
# a metadata pointer (a slice of the step's packed buffer) is or is not 16-byte aligned.
@triton.jit(
    do_not_specialize=[
        "block_tables_ptr", "context_lens_ptr", "stride_qb", "stride_ob", "stride_bt",
        "num_splits",
    ]
)  # fmt: skip
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_cache_block, stride_cache_off, stride_cache_head, stride_bt,
    qk_scale, sliding_window, block_size, num_heads, num_splits,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(context_lens_ptr + seq)
    start = 0
    if USE_WINDOW:  # the query at length - 1 sees keys with (length - 1) - pos < window
        start = tl.maximum(length - sliding_window, 0)
    chunk = tl.cdiv(tl.cdiv(length - start, num_splits), BLOCK_N) * BLOCK_N
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, length)

    g = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + g  # [BLOCK_G]: the q heads of this kv head, padded
    head_ok = g < GROUP
    d = tl.arange(0, D)
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=head_ok[:, None], other=0.0,
    )  # fmt: skip
    acc = tl.zeros([BLOCK_G, D], dtype=tl.float32)
    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_G], dtype=tl.float32)
    table = block_tables_ptr + seq * stride_bt
    head_off = kv_head * stride_cache_head
    for tile in range(lo, hi, BLOCK_N):
        toks = tile + tl.arange(0, BLOCK_N)
        valid = toks < hi
        rows = kv_tile_offsets(table, toks, valid, block_size, stride_cache_block, stride_cache_off)
        ptrs = rows[:, None] + head_off + d[None, :]  # [BLOCK_N, D]
        k = tl.load(k_cache_ptr + ptrs, mask=valid[:, None], other=0.0)
        v = tl.load(v_cache_ptr + ptrs, mask=valid[:, None], other=0.0)
        acc, m, l = online_softmax_step(
            q, k, v, valid[None, :], acc, m, l, qk_scale, DOT_PRECISION, DOT_UPCAST
        )

    out = acc / tl.where(l > 0, l, 1.0)[:, None]  # an empty split (or context) gives zeros
    if SPLIT:
        part = (seq * num_heads + heads) * num_splits + split  # [BLOCK_G]
        tl.store(part_out_ptr + part[:, None] * D + d[None, :], out, mask=head_ok[:, None])
        lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=head_ok)
    else:
        o_ptrs = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])


@triton.jit(do_not_specialize=["stride_ob", "num_splits"])
def _decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, stride_ob, stride_oh, num_heads, num_splits,
    D: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    part = (seq * num_heads + head) * num_splits + s
    lse = tl.load(part_lse_ptr + part, mask=s < num_splits, other=float("-inf"))  # log2 units
    top = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))  # [BLOCK_S]; empty splits: 0
    parts_ptrs = part_out_ptr + part[:, None] * D + d[None, :]
    parts = tl.load(parts_ptrs, mask=(s < num_splits)[:, None], other=0.0)  # [BLOCK_S, D]
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * parts, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def choose_num_splits(batch: int, num_kv_heads: int, max_len: int, device: torch.device) -> int:
    """Enough splits to give every SM two programs, each split at least 256 tokens long;
    a power of two (so that the reduce kernel has few variants to compile)."""
    programs = batch * num_kv_heads
    want = triton.cdiv(2 * num_sms(device), programs)
    n = max(1, min(want, triton.cdiv(max_len, MIN_TOKENS_PER_SPLIT), MAX_SPLITS))
    return 1 << (n.bit_length() - 1)


def paged_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Triton split-KV decode attention; same contract as paged_decode_attention_ref.

    num_splits=None chooses from the batch, the SM count and the longest context the block
    table can hold (its width times block_size: known without a device sync, so the call can
    be captured in a CUDA graph). A sequence of context length 0 gets zeros.
    """
    check_paged_args(q, k_cache, v_cache, block_tables)
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    if batch == 0:
        return out
    if num_splits is None:
        max_len = block_tables.shape[1] * block_size
        num_splits = choose_num_splits(batch, num_kv_heads, max_len, q.device)
    split = num_splits > 1
    if split:
        part_out = torch.empty(
            batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device
        )
        part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_out, part_lse,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        scale * LOG2E, sliding_window or 0, block_size, num_heads, num_splits,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), D=head_dim,
        USE_WINDOW=sliding_window is not None, SPLIT=split, **dot_options(q),
        **(CUDA_CONFIG if q.is_cuda else INTERPRETER_CONFIG),
    )  # fmt: skip
    if split:
        _decode_reduce_kernel[(batch, num_heads)](
            part_out, part_lse, out, out.stride(0), out.stride(1), num_heads, num_splits,
            D=head_dim, BLOCK_S=triton.next_power_of_2(num_splits),
        )  # fmt: skip
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Decode attention over the paged cache, q [B, Hq, D] -> [B, Hq, D]: Triton on CUDA."""
    fn = paged_decode_attention_triton if use_triton(q) else paged_decode_attention_ref
    return fn(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window, num_splits)
