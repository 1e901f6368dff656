"""Everything between the qkv projection and attention, in one launch.

From the fused projection's output qkv [N, (Hq + 2 * Hkv) * D] (q heads, then k, then v):
split out q, k and v, RMSNorm q and k per head (Qwen3's q_norm / k_norm), rotate them by
RoPE (rotate-half layout, as kiln.kernels.rope), return q [N, Hq, D] and write k and v into
the paged KV cache at slot_mapping (-1 = do not store), as kiln.kernels.store_kvcache. Either
step can be left out: no norm weights (GPT-2, Llama), no cos_sin table (learned positions).

The result is bit-identical to the unfused ops (qkv_prepare_ref) on CUDA: every rounding step
of the references is repeated (normalize in float32, round to the dtype, multiply by the
weight, round; rotate in float32, round), floating-point contraction (FMA) is switched off,
and each head's sum of squares is added up in the order of PyTorch's CUDA reduction kernel
(see kiln.kernels.common.torch_sum_plan), so that even the float32 statistics agree to the last bit.
"""

from __future__ import annotations

import torch

from kiln.kernels._triton import pdl_enter, pdl_options, tl, triton, use_pdl, use_triton
from kiln.kernels.common import (
    HeadLayout,
    PagedKV,
    QKNormRope,
    check_qkv_args,
    prepare_heads,
    rope_cos_sin,
    store_token_kv,
    torch_sum_plan,
)
from kiln.kernels.rmsnorm import rmsnorm_ref
from kiln.kernels.rope import rope_ref
from kiln.kernels.store_kvcache import store_kvcache_ref


def split_norm_rope_ref(
    qkv: torch.Tensor, positions: torch.Tensor, heads: HeadLayout, qk: QKNormRope
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain torch: split qkv, per-head RMSNorm and RoPE of q and k: (q, k, v)."""
    q, k, v = heads.split_qkv(qkv)
    if qk.has_norm:
        q, k = rmsnorm_ref(q, qk.q_norm_weight, qk.eps), rmsnorm_ref(k, qk.k_norm_weight, qk.eps)
    if qk.has_rope:
        q, k = rope_ref(q, k, positions, qk.cos_sin)
    return q, k, v


def qkv_prepare_ref(
    qkv: torch.Tensor, positions: torch.Tensor, heads: HeadLayout, qk: QKNormRope, kv: PagedKV
) -> torch.Tensor:
    """Plain torch, the unfused sequence: split, per-head RMSNorm, RoPE, KV store; returns q."""
    q, k, v = split_norm_rope_ref(qkv, positions, heads, qk)
    store_kvcache_ref(k, v, kv.k_cache, kv.v_cache, kv.slot_mapping, kv.scales)
    return q.contiguous()


# positions and slots are slices of the step's packed metadata: whether they are 16-byte
# aligned changes from step to step, which must not compile a new variant mid-serving.
@triton.jit(do_not_specialize=["pos_ptr", "slot_ptr", "stride_qkv"])
def _qkv_prepare_kernel(
    qkv_ptr, pos_ptr, cos_sin_ptr, q_w_ptr, k_w_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
    slot_ptr, scales_ptr,
    stride_qkv, stride_cs, stride_qo_n, stride_qo_h,
    stride_kc_block, stride_kc_off, stride_kc_head,
    stride_vc_block, stride_vc_off, stride_vc_head,
    block_size, num_heads, num_kv_heads, eps,
    HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
    VEC: tl.constexpr, LOG_BW_Q: tl.constexpr, LOG_BW_K: tl.constexpr, PDL: tl.constexpr,
    QUANT: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)  # launched early: wait for the previous kernel's writes
    tok = tl.program_id(0).to(tl.int64)
    row = qkv_ptr + tok * stride_qkv
    cos, sin = rope_cos_sin(pos_ptr + tok, cos_sin_ptr, stride_cs, HAS_ROPE, HALF)
    prepare_heads(
        row, q_out_ptr + tok * stride_qo_n, stride_qo_h, num_heads, q_w_ptr, eps, cos, sin, 1.0,
        HAS_NORM, HAS_ROPE, HALF, BLOCK_HQ, VEC, LOG_BW_Q, 0,
    )  # fmt: skip
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot >= 0:  # else padding: q only
        store_token_kv(
            row, slot, 0, num_kv_heads, k_w_ptr, eps, cos, sin, k_cache_ptr, v_cache_ptr,
            scales_ptr, stride_kc_block, stride_kc_off, stride_kc_head,
            stride_vc_block, stride_vc_off, stride_vc_head,
            block_size, num_heads, num_kv_heads,
            HAS_NORM, HAS_ROPE, HALF, BLOCK_HKV, VEC, LOG_BW_K, QUANT,
        )  # fmt: skip


def qkv_prepare_triton(
    qkv: torch.Tensor, positions: torch.Tensor, heads: HeadLayout, qk: QKNormRope, kv: PagedKV
) -> torch.Tensor:
    """Triton, one program a token for all its heads; same contract as qkv_prepare_ref."""
    check_qkv_args(qkv, positions, heads, qk, kv)
    n, head_dim = qkv.shape[0], heads.head_dim
    num_heads, num_kv_heads = heads.num_heads, heads.num_kv_heads
    k_cache, v_cache = kv.k_cache, kv.v_cache
    q = torch.empty(n, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if n == 0:
        return q
    vec, bw_q = torch_sum_plan(n * num_heads, head_dim)
    _, bw_k = torch_sum_plan(n * num_kv_heads, head_dim)
    has_norm, has_rope = qk.has_norm, qk.has_rope
    dummy = qkv  # stands in for the pointers of the steps left out (never read)
    pdl = use_pdl(qkv)
    _qkv_prepare_kernel[(n,)](
        qkv, positions if has_rope else dummy, qk.cos_sin if has_rope else dummy,
        qk.q_norm_weight if has_norm else dummy, qk.k_norm_weight if has_norm else dummy,
        q, k_cache, v_cache, kv.slot_mapping, kv.scales_arg(dummy),
        qkv.stride(0), qk.cos_sin.stride(0) if has_rope else 0, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        kv.block_size, num_heads, num_kv_heads, qk.eps,
        HAS_NORM=has_norm, HAS_ROPE=has_rope, HALF=head_dim // 2,
        BLOCK_HQ=triton.next_power_of_2(num_heads),
        BLOCK_HKV=triton.next_power_of_2(num_kv_heads),
        VEC=vec, LOG_BW_Q=bw_q.bit_length() - 1, LOG_BW_K=bw_k.bit_length() - 1, PDL=pdl,
        QUANT=kv.quant,
        enable_fp_fusion=False,  # no FMA: round after each multiply, as torch does
        num_warps=2 if n < 256 else 1,  # few warps: the summation tree's reshapes cost less
        **pdl_options(pdl),
    )  # fmt: skip
    return q


def qkv_prepare(
    qkv: torch.Tensor, positions: torch.Tensor, heads: HeadLayout, qk: QKNormRope, kv: PagedKV
) -> torch.Tensor:
    """Split qkv [N, (Hq + 2 Hkv) * D], norm and rotate q and k, store k and v at
    kv.slot_mapping; returns q [N, Hq, D]. Triton on CUDA, the reference elsewhere."""
    fn = qkv_prepare_triton if use_triton(qkv) else qkv_prepare_ref
    return fn(qkv, positions, heads, qk, kv)
