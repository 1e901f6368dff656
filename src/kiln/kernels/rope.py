"""Rotary position embedding, rotate-half layout, for q and k in one launch.

`cos_sin` is RotaryEmbedding's table: [max_pos, D], cos in the first half, sin in the second.
Math in float32, result cast back to the input dtype, like kiln.model.layers._rotate.
"""

from __future__ import annotations

import torch

from kiln.kernels._triton import assert_head_dim, tl, triton, use_triton


def _rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def rope_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: q [N, Hq, D], k [N, Hkv, D], positions [N] -> rotated (q, k)."""
    cos, sin = cos_sin[positions].unsqueeze(-2).chunk(2, dim=-1)  # [N, 1, D/2]
    return _rotate_ref(q, cos, sin), _rotate_ref(k, cos, sin)


@triton.jit
def _rotate_heads(
    x_ptr, out_ptr, stride_x, stride_out, cos, sin, num_heads,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Rotate every head of one token; x_ptr/out_ptr point at the token's row."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HALF)[None, :]
    mask = heads < num_heads
    x1 = tl.load(x_ptr + heads * stride_x + d, mask=mask, other=0.0)
    x2 = tl.load(x_ptr + heads * stride_x + HALF + d, mask=mask, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + heads * stride_out + d, (a * cos - b * sin).to(out_ty), mask=mask)
    tl.store(out_ptr + heads * stride_out + HALF + d, (b * cos + a * sin).to(out_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, cos_sin_ptr,
    stride_qn, stride_qh, stride_kn, stride_kh,
    stride_qon, stride_qoh, stride_kon, stride_koh, stride_cs,
    num_q_heads, num_kv_heads,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
):  # fmt: skip
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    d = tl.arange(0, HALF)[None, :]
    cos = tl.load(cos_sin_ptr + pos * stride_cs + d)  # [1, D/2] float32
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + d)
    _rotate_heads(
        q_ptr + tok * stride_qn, q_out_ptr + tok * stride_qon, stride_qh, stride_qoh,
        cos, sin, num_q_heads, HALF, BLOCK_HQ,
    )  # fmt: skip
    _rotate_heads(
        k_ptr + tok * stride_kn, k_out_ptr + tok * stride_kon, stride_kh, stride_koh,
        cos, sin, num_kv_heads, HALF, BLOCK_HKV,
    )  # fmt: skip


def rope_triton(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton RoPE, one program a token for all its q and k heads; same contract as rope_ref."""
    n, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert_head_dim(head_dim)
    assert k.shape == (n, num_kv_heads, head_dim) and positions.shape == (n,)
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin.stride(-1) == 1
    assert cos_sin.shape[-1] == head_dim and cos_sin.dtype == torch.float32
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if n == 0:
        return q_out, k_out
    _rope_kernel[(n,)](
        q, k, q_out, k_out, positions, cos_sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos_sin.stride(0),
        num_q_heads, num_kv_heads,
        HALF=head_dim // 2,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HKV=triton.next_power_of_2(num_kv_heads),
    )  # fmt: skip
    return q_out, k_out


def rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [N, Hq, D] and k [N, Hkv, D] by their positions: Triton on CUDA."""
    fn = rope_triton if use_triton(q) else rope_ref
    return fn(q, k, positions, cos_sin)
