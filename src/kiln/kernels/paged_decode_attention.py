"""Paged decode attention: one new query per sequence against its cached K/V.

Each program takes one (sequence, kv head, split): the GROUP = Hq / Hkv query heads that share
the kv head ride together as the rows of one tile, so every K/V tile is loaded once for all of
them. For long contexts and small batches the context is cut into `num_splits` pieces
(flash-decoding); each piece writes a partial output and its log-sum-exp, and a second kernel
merges them, or ("last block reduces") the last program of each (sequence, kv head) to finish
merges them itself: the programs count themselves in through an atomic counter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.kernels._triton import (
    num_sms,
    pdl_enter,
    pdl_options,
    tl,
    triton,
    use_pdl,
    use_triton,
)
from kiln.kernels.common import (
    LOG2E,
    PagedKV,
    add_attention_mass,
    add_attention_mass_ref,
    check_paged_args,
    dequantize_pages,
    dot_options,
    kv_tile_offsets,
    load_kv_tile,
    online_softmax_step,
)
from kiln.kernels.kv_quant import load_scales

MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 64
# Launch settings on CUDA (benchmarks/bench_kernels.py sweeps them); the interpreter uses
# 16-token tiles so that tiny tests still cross tile boundaries.
CUDA_CONFIG = dict(BLOCK_N=64, num_warps=4, num_stages=2)
INTERPRETER_CONFIG = dict(BLOCK_N=16, num_warps=4, num_stages=1)


def paged_decode_attention_ref(
    q: torch.Tensor,
    kv: PagedKV,
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Plain torch: q [B, Hq, D] at position kv.context_lens[b] - 1, in one masked SDPA over
    every sequence's gathered (padded) pages. Context length 0 gives zeros.

    num_splits only shapes the Triton kernel's work; the reference ignores it.
    """
    max_ctx = int(kv.context_lens.max()) if q.shape[0] else 0
    if max_ctx == 0:
        return torch.zeros_like(q)
    tables = kv.block_tables[:, : -(-max_ctx // kv.block_size)].long()  # padding is masked
    keys = kv.k_cache[tables].flatten(1, 2)[:, :max_ctx]  # [B, max_ctx, Hkv, D]
    values = kv.v_cache[tables].flatten(1, 2)[:, :max_ctx]
    keys, values = dequantize_pages(keys, values, kv, q.dtype)
    if kv.scores is not None:  # rows of one token (CUDA-graph padding) add none
        for b, length in enumerate(kv.context_lens.tolist()):
            if length > 1:
                k = keys[b, :length]
                add_attention_mass_ref(q[b : b + 1], k, scale, kv, kv.block_tables[b])
    k_pos = torch.arange(max_ctx, device=q.device)[None, :]
    q_pos = kv.context_lens[:, None].long() - 1
    mask = k_pos <= q_pos  # [B, max_ctx]
    if sliding_window is not None:
        mask &= q_pos - k_pos < sliding_window
    out = F.scaled_dot_product_attention(
        q[:, :, None],  # [B, Hq, 1, D]
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=q.shape[1] != kv.k_cache.shape[2],
    )[:, :, 0]
    return out.masked_fill(q_pos[:, :, None] < 0, 0.0)


@triton.jit
def split_range(length, split, num_splits, sliding_window, USE_WINDOW: tl.constexpr, BLOCK_N):
    """The keys [lo, hi) that split `split` of a query at position length - 1 attends to:
    the visible keys cut into num_splits chunks of whole tiles (the last ones may be empty)."""
    start = 0
    if USE_WINDOW:  # the query at length - 1 sees keys with (length - 1) - pos < window
        start = tl.maximum(length - sliding_window, 0)
    chunk = tl.cdiv(tl.cdiv(length - start, num_splits), BLOCK_N) * BLOCK_N
    lo = start + split * chunk
    return lo, tl.minimum(lo + chunk, length)


@triton.jit
def attend_split(
    q, k_cache_ptr, v_cache_ptr, scales_ptr, kv_head, num_kv_heads, table, head_off, lo, hi,
    block_size, stride_cache_block, stride_cache_off, qk_scale,
    D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    QUANT: tl.constexpr,
):  # fmt: skip
    """Flash attention of q [BLOCK_G, D] over the keys [lo, hi) of the sequence whose block
    table is `table`, one kv head (at element head_off of a cache row): (acc, m, l). A
    quantized cache's k scale goes into the scores, its v scale into acc."""
    k_scale, v_scale = load_scales(scales_ptr, kv_head, num_kv_heads, QUANT)
    qk_scale = qk_scale * k_scale
    d = tl.arange(0, D)
    acc = tl.zeros([q.shape[0], D], dtype=tl.float32)
    m = tl.full([q.shape[0]], float("-inf"), dtype=tl.float32)
    l = tl.zeros([q.shape[0]], dtype=tl.float32)
    for tile in range(lo, hi, BLOCK_N):
        toks = tile + tl.arange(0, BLOCK_N)
        valid = toks < hi
        rows = kv_tile_offsets(table, toks, valid, block_size, stride_cache_block, stride_cache_off)
        ptrs = rows[:, None] + head_off + d[None, :]  # [BLOCK_N, D]
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, ptrs, valid, q.dtype, QUANT)
        acc, m, l = online_softmax_step(
            q, k, v, valid[None, :], acc, m, l, qk_scale, DOT_PRECISION, DOT_UPCAST
        )
    return acc * v_scale, m, l


@triton.jit
def decode_attention_mass(
    q, k_cache_ptr, scales_ptr, scores_ptr, kv_head, num_kv_heads, table, head_off, lo, hi,
    length, head_ok, m, l, qk_scale, block_size, stride_cache_block, stride_cache_off,
    D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    QUANT: tl.constexpr,
):  # fmt: skip
    """attend_split's keys' attention mass (H2O), added to scores_ptr (kiln.kernels.common).
    A row of context 1 adds none: a decode graph's padded rows have context 1, and their
    block table row points at block 0, which belongs to some sequence (a real sequence of
    one token is its own sink)."""
    k_scale, _ = load_scales(scales_ptr, kv_head, num_kv_heads, QUANT)
    q_pos = tl.full([q.shape[0]], 0, dtype=tl.int32) + length - 1
    hi = tl.where(length > 1, hi, lo)
    add_attention_mass(
        q, k_cache_ptr, scores_ptr, table, head_off, lo, hi, q_pos, head_ok, m, l,
        qk_scale * k_scale, block_size, stride_cache_block, stride_cache_off,
        D, BLOCK_N, DOT_PRECISION, DOT_UPCAST, QUANT,
    )  # fmt: skip


@triton.jit
def _merge_splits(part_out_ptr, part_lse_ptr, first, head_ok, num_splits, D: tl.constexpr):
    """The reduce kernel's merge for a tile of heads whose split 0 sits at partial index
    `first` [BLOCK_G]; .cg loads: the partials come from other programs, fresh in L2 only."""
    d = tl.arange(0, D)
    top = tl.full(first.shape, float("-inf"), dtype=tl.float32)
    for s in range(num_splits):
        lse = tl.load(
            part_lse_ptr + first + s, mask=head_ok, other=float("-inf"), cache_modifier=".cg"
        )
        top = tl.maximum(top, lse)
    top = tl.where(top == float("-inf"), 0.0, top)
    acc = tl.zeros([first.shape[0], D], dtype=tl.float32)
    total = tl.zeros(first.shape, dtype=tl.float32)
    for s in range(num_splits):
        lse = tl.load(
            part_lse_ptr + first + s, mask=head_ok, other=float("-inf"), cache_modifier=".cg"
        )
        w = tl.exp2(lse - top)  # [BLOCK_G]; empty splits: 0
        ptrs = part_out_ptr + (first + s)[:, None] * D + d[None, :]
        acc += w[:, None] * tl.load(ptrs, mask=head_ok[:, None], other=0.0, cache_modifier=".cg")
        total += w
    return acc / tl.where(total > 0, total, 1.0)[:, None]


@triton.jit
def write_split_output(
    acc, m, l, seq, row, heads, head_ok, split, out_ptr, stride_ob, stride_oh,
    part_out_ptr, part_lse_ptr, counter_ptr, num_heads, num_splits,
    D: tl.constexpr, SPLIT: tl.constexpr, LAST_REDUCES: tl.constexpr,
):  # fmt: skip
    """Finish one (sequence, kv head, split) program for its q heads `heads` [BLOCK_G]: the
    output itself (at output row `row`; the partials are indexed by `seq`), or a partial
    output and its log-sum-exp; with LAST_REDUCES,
    the last split program to get here merges all of them into the output, and sets the
    (sequence, kv head)'s counter at counter_ptr back to 0 for the next launch."""
    d = tl.arange(0, D)
    out = acc / tl.where(l > 0, l, 1.0)[:, None]  # an empty split (or context) gives zeros
    o_ptrs = out_ptr + row * stride_ob + heads[:, None] * stride_oh + d[None, :]
    if SPLIT:
        first = (seq * num_heads + heads) * num_splits  # [BLOCK_G]
        tl.store(
            part_out_ptr + (first + split)[:, None] * D + d[None, :], out, mask=head_ok[:, None]
        )
        lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + first + split, lse, mask=head_ok)
        if LAST_REDUCES:
            # Every thread's partials are written before one thread releases them (gpu scope,
            # acq_rel); the program that counts last acquires all the others' releases.
            tl.debug_barrier()
            if tl.atomic_add(counter_ptr, 1) == num_splits - 1:
                out = _merge_splits(part_out_ptr, part_lse_ptr, first, head_ok, num_splits, D)
                tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
                tl.store(counter_ptr, 0)
    else:
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])


# Arguments that change from step to step are not value-specialized: Triton would otherwise
# compile a new variant, mid-serving, when an int happens to be 1 or a multiple of 16, or when
# a metadata pointer (a slice of the step's packed buffer) is or is not 16-byte aligned.
@triton.jit(
    do_not_specialize=[
        "block_tables_ptr", "context_lens_ptr", "cu_seqlens_q_ptr", "stride_qb", "stride_ob",
        "stride_bt", "num_splits",
    ]
)  # fmt: skip
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, scales_ptr, scores_ptr, block_tables_ptr,
    context_lens_ptr, cu_seqlens_q_ptr, out_ptr, part_out_ptr, part_lse_ptr, counter_ptr,
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_cache_block, stride_cache_off, stride_cache_head, stride_bt,
    qk_scale, sliding_window, block_size, num_heads, num_kv_heads, num_splits,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, SPLIT: tl.constexpr, LAST_REDUCES: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, PDL: tl.constexpr,
    QUANT: tl.constexpr, SCORES: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)  # launched early: wait for the previous kernel's writes
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    row = seq  # of q and out
    q_len = 1
    if VARLEN:  # packed queries: only the sequences with exactly one are this kernel's
        row = tl.load(cu_seqlens_q_ptr + seq)
        q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - row
        row = row.to(tl.int64)
    if q_len != 1:
        return
    length = tl.load(context_lens_ptr + seq)
    lo, hi = split_range(length, split, num_splits, sliding_window, USE_WINDOW, BLOCK_N)

    g = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + g  # [BLOCK_G]: the q heads of this kv head, padded
    head_ok = g < GROUP
    d = tl.arange(0, D)
    q = tl.load(
        q_ptr + row * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=head_ok[:, None], other=0.0,
    )  # fmt: skip
    acc, m, l = attend_split(
        q, k_cache_ptr, v_cache_ptr, scales_ptr, kv_head, num_kv_heads,
        block_tables_ptr + seq * stride_bt, kv_head * stride_cache_head, lo, hi, block_size,
        stride_cache_block, stride_cache_off, qk_scale, D, BLOCK_N, DOT_PRECISION, DOT_UPCAST,
        QUANT,
    )  # fmt: skip
    if SCORES:  # one split (the launcher's rule): (m, l) are final here
        decode_attention_mass(
            q, k_cache_ptr, scales_ptr, scores_ptr, kv_head, num_kv_heads,
            block_tables_ptr + seq * stride_bt, kv_head * stride_cache_head, lo, hi, length,
            head_ok, m, l, qk_scale, block_size, stride_cache_block, stride_cache_off,
            D, BLOCK_N, DOT_PRECISION, DOT_UPCAST, QUANT,
        )  # fmt: skip
    write_split_output(
        acc, m, l, seq, row, heads, head_ok, split, out_ptr, stride_ob, stride_oh,
        part_out_ptr, part_lse_ptr, counter_ptr + seq * num_kv_heads + kv_head, num_heads,
        num_splits, D, SPLIT, LAST_REDUCES,
    )  # fmt: skip


@triton.jit(do_not_specialize=["cu_seqlens_q_ptr", "stride_ob", "num_splits"])
def _decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, cu_seqlens_q_ptr, stride_ob, stride_oh, num_heads,
    num_splits, D: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
    VARLEN: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)  # launched early: wait for the previous kernel's writes
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row = seq  # of out
    q_len = 1
    if VARLEN:  # as _decode_kernel: the sequences with one query only
        row = tl.load(cu_seqlens_q_ptr + seq)
        q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - row
        row = row.to(tl.int64)
    if q_len != 1:
        return
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
    tl.store(out_ptr + row * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


# The "last block reduces" counters, one int32 per (sequence, kv head), zero between launches
# (each launch sets back what it counted). Allocated once per device rather than per call
# because a CUDA graph replays its launches without re-zeroing; buffers outgrown are kept,
# since graphs captured with them still point at them. One launch at a time: concurrent
# launches on different streams of one device would share the counters.
_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}
MIN_COUNTERS = 1 << 16


def split_counters(n: int, device: torch.device) -> torch.Tensor:
    """At least n zeroed int32 counters on `device`, the same buffer from call to call."""
    bufs = _COUNTERS.setdefault(device, [])
    if not bufs or bufs[-1].numel() < n:
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        assert not capturing, "split counters must be allocated before a CUDA graph capture"
        bufs.append(torch.zeros(max(n, MIN_COUNTERS), dtype=torch.int32, device=device))
    return bufs[-1]


def choose_num_splits(batch: int, num_kv_heads: int, max_len: int, device: torch.device) -> int:
    """Enough splits to give every SM two programs, each split at least 256 tokens long;
    a power of two (so that the reduce kernel has few variants to compile)."""
    programs = batch * num_kv_heads
    want = triton.cdiv(2 * num_sms(device), programs)
    n = max(1, min(want, triton.cdiv(max_len, MIN_TOKENS_PER_SPLIT), MAX_SPLITS))
    return 1 << (n.bit_length() - 1)


def split_launch_buffers(
    out: torch.Tensor, kv: PagedKV, num_splits: int | None, last_reduces: bool
) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a split-KV decode launch over kv's B sequences writing out [N, Hq, D] (N = B but
    for packed queries): (num_splits, part_out, part_lse, counters), the split count chosen
    when None (see choose_num_splits) and `out` standing in for the buffers a single split
    does not use."""
    _, num_heads, head_dim = out.shape
    batch = kv.context_lens.shape[0]
    num_kv_heads = kv.k_cache.shape[2]
    if kv.scores is not None:  # the attention mass needs each row's final softmax sums
        num_splits = 1
    if num_splits is None:
        max_len = kv.block_tables.shape[1] * kv.block_size
        num_splits = choose_num_splits(batch, num_kv_heads, max_len, out.device)
    part_out = part_lse = counters = out
    if num_splits > 1:
        f32 = dict(dtype=torch.float32, device=out.device)
        part_out = torch.empty(batch, num_heads, num_splits, head_dim, **f32)
        part_lse = torch.empty(batch, num_heads, num_splits, **f32)
        if last_reduces:
            counters = split_counters(batch * num_kv_heads, out.device)
    return num_splits, part_out, part_lse, counters


def launch_split_merge(
    part_out, part_lse, out, num_splits: int, pdl: bool, cu_seqlens_q=None
) -> None:
    """Merge the splits' partial outputs [B, Hq, splits, D] into out [B, Hq, D]
    (_decode_reduce_kernel); with cu_seqlens_q [B + 1], into the rows of packed queries
    out [N, Hq, D] of the sequences that have exactly one."""
    batch, num_heads, _, head_dim = part_out.shape
    varlen = cu_seqlens_q is not None
    _decode_reduce_kernel[(batch, num_heads)](
        part_out, part_lse, out, cu_seqlens_q if varlen else out, out.stride(0), out.stride(1),
        num_heads, num_splits, D=head_dim, BLOCK_S=triton.next_power_of_2(num_splits),
        PDL=pdl, VARLEN=varlen, **pdl_options(pdl),
    )  # fmt: skip


def paged_decode_attention_triton(
    q: torch.Tensor,
    kv: PagedKV,
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
    last_reduces: bool = False,
    cu_seqlens_q: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton split-KV decode attention; same contract as paged_decode_attention_ref.

    num_splits=None chooses from the batch, the SM count and the longest context the block
    table can hold (its width times block_size: known without a device sync, so the call can
    be captured in a CUDA graph). A sequence of context length 0 gets zeros. last_reduces:
    merge the splits in the attention kernel (see split_counters) instead of a second one.

    Packed queries (kiln.kernels.mixed_attention): with cu_seqlens_q [B + 1], q is [N, Hq, D]
    as varlen prefill takes it, and only the rows of the sequences that have exactly one query
    are attended (written into `out` when given, the rest of it left as it is).
    """
    check_paged_args(q, kv)
    num_heads, head_dim = q.shape[1:]
    batch = kv.context_lens.shape[0]
    k_cache, v_cache, block_tables = kv.k_cache, kv.v_cache, kv.block_tables
    block_size, num_kv_heads = kv.block_size, k_cache.shape[2]
    group = num_heads // num_kv_heads
    varlen = cu_seqlens_q is not None
    if not varlen:
        assert q.shape[0] == batch, f"{q.shape[0]} queries for {batch} sequences"
    out = torch.empty_like(q) if out is None else out
    if batch == 0 or q.shape[0] == 0:
        return out
    num_splits, part_out, part_lse, counters = split_launch_buffers(
        out, kv, num_splits, last_reduces
    )
    split = num_splits > 1
    pdl = use_pdl(q)
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, kv.scales_arg(q), kv.scores_arg(q), block_tables, kv.context_lens,
        cu_seqlens_q if varlen else kv.context_lens, out, part_out, part_lse, counters,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        scale * LOG2E, sliding_window or 0, block_size, num_heads, num_kv_heads, num_splits,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), D=head_dim,
        USE_WINDOW=sliding_window is not None, SPLIT=split, LAST_REDUCES=last_reduces,
        PDL=pdl, QUANT=kv.quant, SCORES=kv.scores is not None, VARLEN=varlen,
        **dot_options(q), **(CUDA_CONFIG if q.is_cuda else INTERPRETER_CONFIG),
        **pdl_options(pdl),
    )  # fmt: skip
    if split and not last_reduces:
        launch_split_merge(part_out, part_lse, out, num_splits, pdl, cu_seqlens_q)
    return out


def paged_decode_attention(
    q: torch.Tensor,
    kv: PagedKV,
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Decode attention over the paged cache, q [B, Hq, D] -> [B, Hq, D]: Triton on CUDA."""
    fn = paged_decode_attention_triton if use_triton(q) else paged_decode_attention_ref
    return fn(q, kv, scale, sliding_window, num_splits)
