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
(see _torch_sum_plan), so that even the float32 statistics agree to the last bit.
"""

from __future__ import annotations

import torch

from kiln.kernels._triton import (
    assert_head_dim,
    pdl_enter,
    pdl_options,
    tl,
    triton,
    use_pdl,
    use_triton,
)
from kiln.kernels.rmsnorm import rmsnorm_ref
from kiln.kernels.rope import rope_ref
from kiln.kernels.store_kvcache import store_kvcache_ref


def _split_heads(
    qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = qkv.shape[0]
    split = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    q, k, v = qkv.split(split, dim=-1)
    return (
        q.reshape(n, num_heads, head_dim),
        k.reshape(n, num_kv_heads, head_dim),
        v.reshape(n, num_kv_heads, head_dim),
    )


def qkv_prepare_ref(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor | None,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:
    """Plain torch, the unfused sequence: split, per-head RMSNorm, RoPE, KV store; returns q."""
    q, k, v = _split_heads(qkv, num_heads, num_kv_heads, k_cache.shape[-1])
    if q_norm_weight is not None:
        q, k = rmsnorm_ref(q, q_norm_weight, eps), rmsnorm_ref(k, k_norm_weight, eps)
    if cos_sin is not None:
        q, k = rope_ref(q, k, positions, cos_sin)
    store_kvcache_ref(k, v, k_cache, v_cache, slot_mapping)
    return q.contiguous()


def _last_pow2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _torch_sum_plan(rows: int, head_dim: int) -> tuple[int, int]:
    """(VEC, BW): how PyTorch's CUDA reduction (ATen/native/cuda/Reduce.cuh, setReduceConfig
    and ReduceOp, torch 2.11 to 2.13) sums each row of a contiguous float32 [rows, head_dim].

    A row is reduced by BW threads. With VEC == 4 ("vectorize along input", head_dim >= 128),
    thread x loads the 4-vectors at elements 4 * (x + BW * j), keeps one running sum per lane
    of the vector and adds the four up in order; with VEC == 1 it is the same as one element
    a thread (BW == head_dim). The BW partial sums then meet in a halving tree (x += x + BW/2,
    down to 1: the shared-memory steps, then warp shuffles with decreasing offsets).
    """
    vec = 4 if head_dim >= 128 else 1
    dim0 = head_dim // vec
    max_threads = 512
    dim0_pow2 = _last_pow2(dim0) if dim0 < max_threads else max_threads
    dim1_pow2 = _last_pow2(rows) if rows < max_threads else max_threads
    width = min(dim0_pow2, 32)
    height = min(dim1_pow2, max_threads // width)
    width = min(dim0_pow2, max_threads // height)
    assert head_dim <= 512, "beyond that torch may split a row across warps"
    return vec, (width if vec == 4 else head_dim)


@triton.jit
def _squares(ptrs, mask):
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return x * x


@triton.jit
def _sum_squares(
    src_ptr, num_heads, D: tl.constexpr, VEC: tl.constexpr, LOG_BW: tl.constexpr,
    BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Per head, the sum of x² over its D values in torch's order (_torch_sum_plan):
    [BLOCK_H, 1]. src_ptr is the first head; heads are D apart."""
    BW: tl.constexpr = 1 << LOG_BW
    heads = tl.arange(0, BLOCK_H)[:, None]
    mask = heads < num_heads
    row = src_ptr + heads * D
    lanes = tl.arange(0, BW)[None, :]  # one column a reduction thread
    if VEC == 4:
        base = row + 4 * lanes
        s0 = _squares(base, mask)
        s1 = _squares(base + 1, mask)
        s2 = _squares(base + 2, mask)
        s3 = _squares(base + 3, mask)
        for j in tl.static_range(1, D // (4 * BW)):
            s0 += _squares(base + 4 * BW * j, mask)
            s1 += _squares(base + 4 * BW * j + 1, mask)
            s2 += _squares(base + 4 * BW * j + 2, mask)
            s3 += _squares(base + 4 * BW * j + 3, mask)
        s = ((s0 + s1) + s2) + s3
    else:
        s = _squares(row + lanes, mask)
    # the halving tree: a sum over an axis of size 2 is one addition, the tree's own
    for level in tl.static_range(LOG_BW):
        s = tl.sum(tl.reshape(s, [BLOCK_H, 2, BW >> (level + 1)]), axis=1)
    return s


@triton.jit
def _norm_rope_heads(
    src_ptr, num_heads, w_ptr, eps, cos, sin,
    HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    VEC: tl.constexpr, LOG_BW: tl.constexpr,
):  # fmt: skip
    """Norm and rotate every head of one token; src_ptr is the token's first head (stride D).
    Returns each head's two halves, [BLOCK_H, D/2] each (padded heads hold zeros)."""
    D: tl.constexpr = 2 * HALF
    heads = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HALF)[None, :]
    mask = heads < num_heads
    src = src_ptr + heads * D
    x1 = tl.load(src + d, mask=mask, other=0.0)
    x2 = tl.load(src + HALF + d, mask=mask, other=0.0)
    ty = x1.dtype
    if HAS_NORM:  # rmsnorm_ref: normalize in float32, round, times the weight, round
        ss = _sum_squares(src_ptr, num_heads, D, VEC, LOG_BW, BLOCK_H)
        rstd = tl.rsqrt(ss * (1.0 / D) + eps)
        w1 = tl.load(w_ptr + d).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + d).to(tl.float32)
        x1 = ((x1.to(tl.float32) * rstd).to(ty).to(tl.float32) * w1).to(ty)
        x2 = ((x2.to(tl.float32) * rstd).to(ty).to(tl.float32) * w2).to(ty)
    if HAS_ROPE:  # rope_ref: rotate in float32, round
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        x1 = (a * cos - b * sin).to(ty)
        x2 = (b * cos + a * sin).to(ty)
    return x1, x2


@triton.jit
def _prepare_heads(
    src_ptr, dst_ptr, dst_stride_h, num_heads, w_ptr, eps, cos, sin,
    HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    VEC: tl.constexpr, LOG_BW: tl.constexpr,
):  # fmt: skip
    """_norm_rope_heads, stored at dst_ptr (heads dst_stride_h apart)."""
    x1, x2 = _norm_rope_heads(
        src_ptr, num_heads, w_ptr, eps, cos, sin, HAS_NORM, HAS_ROPE, HALF, BLOCK_H, VEC, LOG_BW
    )
    heads = tl.arange(0, BLOCK_H)[:, None]
    dst = dst_ptr + heads * dst_stride_h + tl.arange(0, HALF)[None, :]
    tl.store(dst, x1, mask=heads < num_heads)
    tl.store(dst + HALF, x2, mask=heads < num_heads)


@triton.jit
def _rope_cos_sin(pos_ptr, cos_sin_ptr, stride_cs, HAS_ROPE: tl.constexpr, HALF: tl.constexpr):
    """RoPE's factors at the position *pos_ptr: cos, sin [1, D/2] float32 (0.0 without RoPE)."""
    cos, sin = 0.0, 0.0
    if HAS_ROPE:
        pos = tl.load(pos_ptr).to(tl.int64)
        d = tl.arange(0, HALF)[None, :]
        cos = tl.load(cos_sin_ptr + pos * stride_cs + d)
        sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + d)
    return cos, sin


@triton.jit
def _store_token_kv(
    row_ptr, slot, first_head, count, k_w_ptr, eps, cos, sin, k_cache_ptr, v_cache_ptr,
    stride_kc_block, stride_kc_off, stride_kc_head,
    stride_vc_block, stride_vc_off, stride_vc_head,
    block_size, num_heads, num_kv_heads,
    HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    VEC: tl.constexpr, LOG_BW: tl.constexpr,
):  # fmt: skip
    """Norm and rotate the k of kv heads [first_head, first_head + count) of the token whose
    qkv row starts at row_ptr, and store them and their v in the cache at `slot` (>= 0)."""
    D: tl.constexpr = 2 * HALF
    block, off = slot // block_size, slot % block_size
    k_dst = k_cache_ptr + block * stride_kc_block + off * stride_kc_off
    _prepare_heads(
        row_ptr + (num_heads + first_head) * D, k_dst + first_head * stride_kc_head,
        stride_kc_head, count, k_w_ptr, eps, cos, sin,
        HAS_NORM, HAS_ROPE, HALF, BLOCK_H, VEC, LOG_BW,
    )  # fmt: skip
    heads = tl.arange(0, BLOCK_H)[:, None]
    dd = tl.arange(0, D)[None, :]
    mask = heads < count
    v = tl.load(row_ptr + (num_heads + num_kv_heads + first_head + heads) * D + dd, mask=mask)
    v_dst = v_cache_ptr + block * stride_vc_block + off * stride_vc_off
    tl.store(v_dst + (first_head + heads) * stride_vc_head + dd, v, mask=mask)


# positions and slots are slices of the step's packed metadata: whether they are 16-byte
# aligned changes from step to step, which must not compile a new variant mid-serving.
@triton.jit(do_not_specialize=["pos_ptr", "slot_ptr", "stride_qkv"])
def _qkv_prepare_kernel(
    qkv_ptr, pos_ptr, cos_sin_ptr, q_w_ptr, k_w_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
    slot_ptr,
    stride_qkv, stride_cs, stride_qo_n, stride_qo_h,
    stride_kc_block, stride_kc_off, stride_kc_head,
    stride_vc_block, stride_vc_off, stride_vc_head,
    block_size, num_heads, num_kv_heads, eps,
    HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
    VEC: tl.constexpr, LOG_BW_Q: tl.constexpr, LOG_BW_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)  # launched early: wait for the previous kernel's writes
    tok = tl.program_id(0).to(tl.int64)
    row = qkv_ptr + tok * stride_qkv
    cos, sin = _rope_cos_sin(pos_ptr + tok, cos_sin_ptr, stride_cs, HAS_ROPE, HALF)
    _prepare_heads(
        row, q_out_ptr + tok * stride_qo_n, stride_qo_h, num_heads, q_w_ptr, eps, cos, sin,
        HAS_NORM, HAS_ROPE, HALF, BLOCK_HQ, VEC, LOG_BW_Q,
    )  # fmt: skip
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot >= 0:  # else padding: q only
        _store_token_kv(
            row, slot, 0, num_kv_heads, k_w_ptr, eps, cos, sin, k_cache_ptr, v_cache_ptr,
            stride_kc_block, stride_kc_off, stride_kc_head,
            stride_vc_block, stride_vc_off, stride_vc_head,
            block_size, num_heads, num_kv_heads,
            HAS_NORM, HAS_ROPE, HALF, BLOCK_HKV, VEC, LOG_BW_K,
        )  # fmt: skip


def check_qkv_args(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor | None,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> tuple[bool, bool]:
    """Assert the shapes and layouts the qkv kernels rely on; returns (has_norm, has_rope)."""
    n, head_dim = qkv.shape[0], k_cache.shape[-1]
    assert_head_dim(head_dim)
    assert qkv.shape == (n, (num_heads + 2 * num_kv_heads) * head_dim) and qkv.stride(-1) == 1
    assert k_cache.shape[2:] == (num_kv_heads, head_dim) and v_cache.shape == k_cache.shape
    assert k_cache.dtype == v_cache.dtype == qkv.dtype
    assert k_cache.stride(-1) == v_cache.stride(-1) == 1 and slot_mapping.shape == (n,)
    has_norm, has_rope = q_norm_weight is not None, cos_sin is not None
    assert has_norm == (k_norm_weight is not None), "q_norm_weight and k_norm_weight go together"
    if has_norm:
        for w in (q_norm_weight, k_norm_weight):
            assert w.shape == (head_dim,) and w.is_contiguous() and w.dtype == qkv.dtype
    if has_rope:
        assert positions.shape == (n,) and cos_sin.stride(-1) == 1
        assert cos_sin.shape[-1] == head_dim and cos_sin.dtype == torch.float32
    return has_norm, has_rope


def qkv_prepare_triton(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor | None,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:
    """Triton, one program a token for all its heads; same contract as qkv_prepare_ref."""
    n, head_dim = qkv.shape[0], k_cache.shape[-1]
    has_norm, has_rope = check_qkv_args(
        qkv, positions, cos_sin, q_norm_weight, k_norm_weight, k_cache, v_cache, slot_mapping,
        num_heads, num_kv_heads,
    )  # fmt: skip
    q = torch.empty(n, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if n == 0:
        return q
    vec, bw_q = _torch_sum_plan(n * num_heads, head_dim)
    _, bw_k = _torch_sum_plan(n * num_kv_heads, head_dim)
    dummy = qkv  # stands in for the pointers of the steps left out (never read)
    pdl = use_pdl(qkv)
    _qkv_prepare_kernel[(n,)](
        qkv, positions if has_rope else dummy, cos_sin if has_rope else dummy,
        q_norm_weight if has_norm else dummy, k_norm_weight if has_norm else dummy,
        q, k_cache, v_cache, slot_mapping,
        qkv.stride(0), cos_sin.stride(0) if has_rope else 0, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_cache.shape[1], num_heads, num_kv_heads, eps,
        HAS_NORM=has_norm, HAS_ROPE=has_rope, HALF=head_dim // 2,
        BLOCK_HQ=triton.next_power_of_2(num_heads),
        BLOCK_HKV=triton.next_power_of_2(num_kv_heads),
        VEC=vec, LOG_BW_Q=bw_q.bit_length() - 1, LOG_BW_K=bw_k.bit_length() - 1, PDL=pdl,
        enable_fp_fusion=False,  # no FMA: round after each multiply, as torch does
        num_warps=2 if n < 256 else 1,  # few warps: the summation tree's reshapes cost less
        **pdl_options(pdl),
    )  # fmt: skip
    return q


def qkv_prepare(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor | None,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:
    """Split qkv, norm and rotate q and k, store k and v at slot_mapping; returns q [N, Hq, D].

    Triton on CUDA, the reference elsewhere.
    """
    fn = qkv_prepare_triton if use_triton(qkv) else qkv_prepare_ref
    return fn(
        qkv, positions, cos_sin, q_norm_weight, k_norm_weight, eps,
        k_cache, v_cache, slot_mapping, num_heads, num_kv_heads,
    )  # fmt: skip
