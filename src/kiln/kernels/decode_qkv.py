"""A decode step's attention straight from the qkv projection: qkv_prepare and paged decode
attention in one kernel (plus the split merge, a second one, when the context is split).

From the fused projection's output qkv [B, (Hq + 2 * Hkv) * D], one new token per sequence:
norm and rotate q and k per head, store the new k and v in the paged cache at slot_mapping
(-1 = do not store), attend each q over its sequence's pages and merge the splits. Of the
three launches of the unfused path (_qkv_prepare_kernel, _decode_kernel,
_decode_reduce_kernel) the first two become one, which is what launch-bound batch-1 decode
wants (`benchmarks/profile_decode.py --variants`; numbers in notes/BENCHMARKS.md).

Each program takes one (sequence, kv head, split), as paged_decode_attention's kernel does:
- it recomputes the norm and RoPE of its GROUP q heads from the qkv row (with the helpers
  qkv_prepare's kernel uses, from kiln.kernels.common, so q and the stored k are
  bit-identical to that kernel's);
- the program whose split holds the new token (position context_len - 1: the last non-empty
  split) prepares its kv head's k and v, stores them at the sequence's slot, and waits at a
  CTA barrier, so that its attention loop reads the new token back from the cache. No other
  program reads that slot (the slot belongs to the sequence's own, unshared last block), so
  no program waits on another;
- with several splits, _decode_reduce_kernel merges the partial outputs; or (last_reduces)
  the last program of each (sequence, kv head) to finish does, through atomic counters
  (paged_decode_attention.split_counters): one launch fewer, but measured slower (0.97-0.98
  ms for the same graph), so not the default.

With PDL (programmatic dependent launch, Hopper and newer), the kernels let the next kernel
launch at once and wait for the previous one to finish before their first load.
"""

from __future__ import annotations

import torch

from kiln.kernels._triton import pdl_enter, pdl_options, tl, triton, use_pdl, use_triton
from kiln.kernels.common import (
    LOG2E,
    HeadLayout,
    PagedKV,
    QKNormRope,
    check_paged_args,
    check_qkv_args,
    dot_options,
    norm_rope_heads,
    rope_cos_sin,
    store_token_kv,
    torch_sum_plan,
)
from kiln.kernels.paged_decode_attention import (
    CUDA_CONFIG,
    INTERPRETER_CONFIG,
    attend_split,
    decode_attention_mass,
    launch_split_merge,
    paged_decode_attention_ref,
    split_launch_buffers,
    split_range,
    write_split_output,
)
from kiln.kernels.qkv_prepare import qkv_prepare_ref


def paged_decode_qkv_ref(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    heads: HeadLayout,
    qk: QKNormRope,
    kv: PagedKV,
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Plain torch, the unfused sequence: qkv_prepare_ref, then paged_decode_attention_ref."""
    q = qkv_prepare_ref(qkv, positions, heads, qk, kv)
    return paged_decode_attention_ref(q, kv, scale, sliding_window)


# Per-step ints and metadata pointers are not value-specialized (see _decode_kernel).
@triton.jit(
    do_not_specialize=[
        "pos_ptr", "slot_ptr", "block_tables_ptr", "context_lens_ptr", "stride_qkv",
        "stride_bt", "num_splits",
    ]
)  # fmt: skip
def _decode_qkv_kernel(
    qkv_ptr, pos_ptr, cos_sin_ptr, q_w_ptr, k_w_ptr, k_cache_ptr, v_cache_ptr, scales_ptr,
    scores_ptr, slot_ptr, block_tables_ptr, context_lens_ptr, out_ptr, part_out_ptr,
    part_lse_ptr, counter_ptr,
    stride_qkv, stride_cs, stride_ob, stride_oh,
    stride_cache_block, stride_cache_off, stride_cache_head, stride_bt,
    eps, qk_scale, sliding_window, block_size, num_heads, num_kv_heads, num_splits,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr,
    VEC: tl.constexpr, LOG_BW_Q: tl.constexpr, LOG_BW_K: tl.constexpr,
    USE_WINDOW: tl.constexpr, SPLIT: tl.constexpr, LAST_REDUCES: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, PDL: tl.constexpr,
    QUANT: tl.constexpr, SCORES: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)  # launched early: wait for the previous kernel's writes
    D: tl.constexpr = 2 * HALF
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(context_lens_ptr + seq)
    lo, hi = split_range(length, split, num_splits, sliding_window, USE_WINDOW, BLOCK_N)

    row = qkv_ptr + seq * stride_qkv
    cos, sin = rope_cos_sin(pos_ptr + seq, cos_sin_ptr, stride_cs, HAS_ROPE, HALF)
    q1, q2 = norm_rope_heads(
        row + kv_head * GROUP * D, GROUP, q_w_ptr, eps, cos, sin,
        HAS_NORM, HAS_ROPE, HALF, BLOCK_G, VEC, LOG_BW_Q,
    )  # fmt: skip
    q = tl.reshape(tl.permute(tl.join(q1, q2), (0, 2, 1)), (BLOCK_G, D))  # halves side by side

    # The new token (position length - 1) is the last of the last non-empty split; a context
    # of length 0 has none, but its slot (if any) is still stored, as qkv_prepare does.
    holds_new = ((lo < hi) & (hi == length)) | ((length == 0) & (split == 0))
    slot = tl.load(slot_ptr + seq).to(tl.int64)
    if holds_new & (slot >= 0):  # else padding: nothing to store
        store_token_kv(
            row, slot, kv_head, 1, k_w_ptr, eps, cos, sin, k_cache_ptr, v_cache_ptr, scales_ptr,
            stride_cache_block, stride_cache_off, stride_cache_head,
            stride_cache_block, stride_cache_off, stride_cache_head,
            block_size, num_heads, num_kv_heads,
            HAS_NORM, HAS_ROPE, HALF, 1, VEC, LOG_BW_K, QUANT,
        )  # fmt: skip
        tl.debug_barrier()  # the stores are done (and visible CTA-wide) before the loop reads

    g = tl.arange(0, BLOCK_G)
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
            g < GROUP, m, l, qk_scale, block_size, stride_cache_block, stride_cache_off,
            D, BLOCK_N, DOT_PRECISION, DOT_UPCAST, QUANT,
        )  # fmt: skip
    write_split_output(
        acc, m, l, seq, seq, kv_head * GROUP + g, g < GROUP, split, out_ptr, stride_ob,
        stride_oh,
        part_out_ptr, part_lse_ptr, counter_ptr + seq * num_kv_heads + kv_head, num_heads,
        num_splits, D, SPLIT, LAST_REDUCES,
    )  # fmt: skip


def paged_decode_qkv_triton(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    heads: HeadLayout,
    qk: QKNormRope,
    kv: PagedKV,
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
    pdl: bool = True,
    last_reduces: bool = False,
) -> torch.Tensor:
    """Triton; same contract as paged_decode_qkv_ref, for kv.slot_mapping[b] either -1 or the
    cache slot of sequence b's token kv.context_lens[b] - 1.

    num_splits=None chooses as paged_decode_attention_triton does; with more than one split,
    a second kernel merges them, or (last_reduces) the last program of each (sequence, kv
    head) does, through atomic counters: then calls on one device share the counters and no
    two may run at once on different streams. pdl: launch with programmatic dependent launch
    where kiln.kernels._triton.use_pdl allows it (CUDA, compute capability 9.0 or newer, not
    switched off), else plainly.
    """
    check_qkv_args(qkv, positions, heads, qk, kv)
    num_heads, num_kv_heads, head_dim = heads.num_heads, heads.num_kv_heads, heads.head_dim
    batch, q_view = qkv.shape[0], heads.split_qkv(qkv)[0]
    check_paged_args(q_view, kv)
    k_cache, v_cache, block_tables = kv.k_cache, kv.v_cache, kv.block_tables
    assert block_tables.shape[0] == batch and kv.context_lens.shape == (batch,)
    pdl = pdl and use_pdl(qkv)
    out = torch.empty(batch, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if batch == 0:
        return out
    num_splits, part_out, part_lse, counters = split_launch_buffers(
        out, kv, num_splits, last_reduces
    )
    split = num_splits > 1
    vec, bw_q = torch_sum_plan(batch * num_heads, head_dim)  # as qkv_prepare_triton sums
    _, bw_k = torch_sum_plan(batch * num_kv_heads, head_dim)
    has_norm, has_rope = qk.has_norm, qk.has_rope
    dummy = qkv  # stands in for the pointers of the steps left out (never read)
    _decode_qkv_kernel[(batch, num_kv_heads, num_splits)](
        qkv, positions if has_rope else dummy, qk.cos_sin if has_rope else dummy,
        qk.q_norm_weight if has_norm else dummy, qk.k_norm_weight if has_norm else dummy,
        k_cache, v_cache, kv.scales_arg(dummy), kv.scores_arg(dummy), kv.slot_mapping,
        block_tables, kv.context_lens,
        out, part_out, part_lse, counters,
        qkv.stride(0), qk.cos_sin.stride(0) if has_rope else 0, out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        qk.eps, scale * LOG2E, sliding_window or 0, kv.block_size, num_heads, num_kv_heads,
        num_splits,
        GROUP=heads.group, BLOCK_G=max(16, triton.next_power_of_2(heads.group)),
        HALF=head_dim // 2, HAS_NORM=has_norm, HAS_ROPE=has_rope,
        VEC=vec, LOG_BW_Q=bw_q.bit_length() - 1, LOG_BW_K=bw_k.bit_length() - 1,
        USE_WINDOW=sliding_window is not None, SPLIT=split, LAST_REDUCES=last_reduces, PDL=pdl,
        QUANT=kv.quant, SCORES=kv.scores is not None,
        enable_fp_fusion=False,  # no FMA: q and k round as qkv_prepare's do
        **dot_options(qkv), **(CUDA_CONFIG if qkv.is_cuda else INTERPRETER_CONFIG),
        **pdl_options(pdl),
    )  # fmt: skip
    if split and not last_reduces:
        launch_split_merge(part_out, part_lse, out, num_splits, pdl)
    return out


def paged_decode_qkv(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    heads: HeadLayout,
    qk: QKNormRope,
    kv: PagedKV,
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """A decode step's attention from qkv [B, (Hq + 2 Hkv) * D] -> [B, Hq, D], storing the
    new k and v: Triton on CUDA, the reference elsewhere."""
    fn = paged_decode_qkv_triton if use_triton(qkv) else paged_decode_qkv_ref
    return fn(qkv, positions, heads, qk, kv, scale, sliding_window, num_splits)
