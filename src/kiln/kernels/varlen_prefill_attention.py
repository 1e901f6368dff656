"""Varlen flash attention for prefill chunks, reading K/V from the paged cache.

The step's queries are packed: sequence b owns rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q,
the last q_len of its context_lens[b] tokens, whose K/V (cached prefix and the chunk's own new
tokens) are already in the cache. One kernel thus covers a fresh prompt, a chunk of a long
prompt, and a prompt whose prefix came from the prefix cache.

The grid is sized without reading the lengths on the host (no device sync, CUDA-graph safe):
sequence b's query tiles are numbered from cu_seqlens_q[b] // BLOCK_M + b, which leaves room
for all of them in Nq // BLOCK_M + B program ids; a program finds its sequence by counting
the tile starts at or below its own id, and spare ids exit at once.
"""

from __future__ import annotations

import torch

from kiln.kernels._triton import tl, triton, use_triton
from kiln.kernels.common import (
    LOG2E,
    PagedKV,
    add_attention_mass,
    attend_paged_ref,
    check_paged_args,
    dot_options,
    kv_tile_offsets,
    load_kv_tile,
    online_softmax_step,
)
from kiln.kernels.kv_quant import load_scales

# Launch settings on CUDA by head_dim (benchmarks/bench_kernels.py sweeps them); the
# interpreter uses 16x16 tiles so that tiny tests still cross tile boundaries.
CUDA_CONFIGS = {
    64: dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    128: dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    256: dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
}
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
MIN_BLOCK_B = 64  # the smallest sequence-offset tile (next_power_of_2(num_seqs) above it)


def varlen_prefill_attention_ref(
    q: torch.Tensor,
    kv: PagedKV,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Plain torch, one sequence at a time: q [Nq, Hq, D] -> [Nq, Hq, D], causal."""
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for b, length in enumerate(kv.context_lens.tolist()):
        start, end = bounds[b], bounds[b + 1]
        if end > start:
            out[start:end] = attend_paged_ref(
                q[start:end], kv, kv.block_tables[b], length, scale, sliding_window
            )
    return out


# Arguments that change from step to step are not value-specialized (no mid-serving compiles):
# ints that may be 1 or a multiple of 16, metadata pointers that may or may not be aligned.
@triton.jit(
    do_not_specialize=[
        "cu_seqlens_q_ptr", "context_lens_ptr", "block_tables_ptr",
        "stride_qn", "stride_on", "stride_bt", "num_seqs",
    ]
)  # fmt: skip
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, scales_ptr, scores_ptr, cu_seqlens_q_ptr,
    context_lens_ptr, block_tables_ptr, out_ptr,
    stride_qn, stride_qh, stride_on, stride_oh,
    stride_cache_block, stride_cache_off, stride_cache_head, stride_bt,
    qk_scale, sliding_window, block_size, num_seqs, num_kv_heads,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr, USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, QUANT: tl.constexpr,
    SCORES: tl.constexpr, SKIP_SINGLE: tl.constexpr,
):  # fmt: skip
    tile_id = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP

    seqs = tl.arange(0, BLOCK_B)
    in_batch = seqs < num_seqs
    firsts = tl.load(cu_seqlens_q_ptr + seqs, mask=in_batch, other=0) // BLOCK_M + seqs
    seq = tl.sum(((firsts <= tile_id) & in_batch).to(tl.int32), 0) - 1
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    m_tile = tile_id - (q_start // BLOCK_M + seq)  # this program's tile within its sequence
    done = m_tile * BLOCK_M >= q_len
    if SKIP_SINGLE:  # one query: the decode kernel's (kiln.kernels.mixed_attention)
        done = done | (q_len == 1)
    if done:
        return

    length = tl.load(context_lens_ptr + seq)
    rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    q_pos = length - q_len + rows  # [BLOCK_M]
    d = tl.arange(0, D)
    tok_rows = (q_start + rows).to(tl.int64)
    q = tl.load(
        q_ptr + tok_rows[:, None] * stride_qn + head * stride_qh + d[None, :],
        mask=row_ok[:, None], other=0.0,
    )  # fmt: skip

    first_pos = length - q_len + m_tile * BLOCK_M
    hi = tl.minimum(length, first_pos + BLOCK_M)  # causal: nothing past the tile's last query
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(first_pos - sliding_window + 1, 0)
    k_scale, v_scale = load_scales(scales_ptr, kv_head, num_kv_heads, QUANT)
    qk_scale = qk_scale * k_scale  # a quantized cache's k scale goes into the scores
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    head_off = kv_head * stride_cache_head
    for tile in range(lo, hi, BLOCK_N):
        toks = tile + tl.arange(0, BLOCK_N)
        tok_ok = toks < hi
        offs = kv_tile_offsets(
            table, toks, tok_ok, block_size, stride_cache_block, stride_cache_off
        )
        ptrs = offs[:, None] + head_off + d[None, :]  # [BLOCK_N, D]
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, ptrs, tok_ok, q.dtype, QUANT)
        valid = tok_ok[None, :] & (toks[None, :] <= q_pos[:, None])  # [BLOCK_M, BLOCK_N]
        if USE_WINDOW:
            valid = valid & (q_pos[:, None] - toks[None, :] < sliding_window)
        acc, m, l = online_softmax_step(
            q, k, v, valid, acc, m, l, qk_scale, DOT_PRECISION, DOT_UPCAST
        )

    if SCORES:  # H2O: a second pass adds each key's probability to its slot
        add_attention_mass(
            q, k_cache_ptr, scores_ptr, table, head_off, lo, hi, q_pos, row_ok, m, l,
            qk_scale, block_size, stride_cache_block, stride_cache_off,
            D, BLOCK_N, DOT_PRECISION, DOT_UPCAST, QUANT,
        )  # fmt: skip
    out = acc * (v_scale / tl.where(l > 0, l, 1.0))[:, None]
    o_ptrs = out_ptr + tok_rows[:, None] * stride_on + head * stride_oh + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def prefill_block_b(num_seqs: int) -> int:
    """The tile of sequence offsets each program scans: few sizes, so few compiled variants."""
    return max(MIN_BLOCK_B, triton.next_power_of_2(num_seqs))


def varlen_prefill_attention_triton(
    q: torch.Tensor,
    kv: PagedKV,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    skip_single: bool = False,
) -> torch.Tensor:
    """Triton varlen flash attention over paged K/V; same contract as the reference.

    out: the output (None: a new one); skip_single: leave the rows of sequences with
    exactly one query alone (kiln.kernels.mixed_attention attends them)."""
    check_paged_args(q, kv)
    num_tokens, num_heads, head_dim = q.shape
    k_cache, v_cache, block_tables = kv.k_cache, kv.v_cache, kv.block_tables
    num_seqs = kv.context_lens.shape[0]
    assert cu_seqlens_q.shape == (num_seqs + 1,)
    out = torch.empty_like(q) if out is None else out
    if num_tokens == 0:
        return out
    if q.is_cuda:
        config = CUDA_CONFIGS[min(max(head_dim, 64), 256)]
    else:
        config = INTERPRETER_CONFIG
    grid = (num_tokens // config["BLOCK_M"] + num_seqs, num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, kv.scales_arg(q), kv.scores_arg(q), cu_seqlens_q, kv.context_lens,
        block_tables, out,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        scale * LOG2E, sliding_window or 0, kv.block_size, num_seqs, k_cache.shape[2],
        GROUP=num_heads // k_cache.shape[2], D=head_dim,
        BLOCK_B=prefill_block_b(num_seqs), USE_WINDOW=sliding_window is not None,
        QUANT=kv.quant, SCORES=kv.scores is not None, SKIP_SINGLE=skip_single,
        **dot_options(q), **config,
    )  # fmt: skip
    return out


def varlen_prefill_attention(
    q: torch.Tensor,
    kv: PagedKV,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of packed prefill chunks over their paged K/V: Triton on CUDA."""
    fn = varlen_prefill_attention_triton if use_triton(q) else varlen_prefill_attention_ref
    return fn(q, kv, cu_seqlens_q, scale, sliding_window)
