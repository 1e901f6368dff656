"""Write the step's new K/V into the paged cache.

Cache layout, per layer: [num_blocks, block_size, num_kv_heads, head_dim]; token i goes to
slot `slot_mapping[i]` = block_id * block_size + offset, and slot -1 means "do not store".
A quantized cache (fp8 / int8, kiln.kernels.kv_quant) takes the layer's scales [4, Hkv].
"""

from __future__ import annotations

import torch

from kiln.kernels._triton import assert_head_dim, tl, triton, use_triton
from kiln.kernels.kv_quant import quant_kind, quantize_kv, quantize_ref


def store_kvcache_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    scales: torch.Tensor | None = None,
) -> None:
    """Plain torch: k, v [N, Hkv, D] into the caches at slot_mapping [N] (in place),
    quantized with scales [4, Hkv] when the cache is fp8 / int8."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k, v = k[keep], v[keep]
    if quant_kind(k_cache):
        k, v = quantize_ref(k, scales[2], k_cache.dtype), quantize_ref(v, scales[3], v_cache.dtype)
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v


@triton.jit
def _store_kvcache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, scales_ptr,
    stride_kn, stride_kh, stride_vn, stride_vh,
    stride_kc_block, stride_kc_off, stride_kc_head,
    stride_vc_block, stride_vc_off, stride_vc_head,
    block_size, num_kv_heads,
    D: tl.constexpr, BLOCK_H: tl.constexpr, QUANT: tl.constexpr,
):  # fmt: skip
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:  # padding: nothing to store
        return
    heads = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, D)[None, :]
    mask = heads < num_kv_heads
    block, off = slot // block_size, slot % block_size
    k = tl.load(k_ptr + tok * stride_kn + heads * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + tok * stride_vn + heads * stride_vh + d, mask=mask)
    kc = k_cache_ptr + block * stride_kc_block + off * stride_kc_off + heads * stride_kc_head + d
    vc = v_cache_ptr + block * stride_vc_block + off * stride_vc_off + heads * stride_vc_head + d
    inv_k, inv_v = 1.0, 1.0
    if QUANT != 0:  # the reciprocal scales, rows 2 and 3 of the layer's [4, Hkv]
        inv_k = tl.load(scales_ptr + 2 * num_kv_heads + heads, mask=mask, other=1.0)
        inv_v = tl.load(scales_ptr + 3 * num_kv_heads + heads, mask=mask, other=1.0)
    k, v = quantize_kv(k, inv_k, QUANT), quantize_kv(v, inv_v, QUANT)
    tl.store(kc, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kvcache_triton(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    scales: torch.Tensor | None = None,
) -> None:
    """Triton store, one program a token; same contract as store_kvcache_ref."""
    n, num_kv_heads, head_dim = k.shape
    assert_head_dim(head_dim)
    assert v.shape == k.shape and slot_mapping.shape == (n,)
    assert k_cache.shape[2:] == (num_kv_heads, head_dim) and v_cache.shape == k_cache.shape
    assert k.stride(-1) == v.stride(-1) == k_cache.stride(-1) == v_cache.stride(-1) == 1
    quant = quant_kind(k_cache)
    assert not quant or (scales is not None and scales.shape == (4, num_kv_heads))
    if n == 0:
        return
    _store_kvcache_kernel[(n,)](
        k, v, k_cache, v_cache, slot_mapping, scales if quant else k,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_cache.shape[1], num_kv_heads,
        D=head_dim, BLOCK_H=triton.next_power_of_2(num_kv_heads), QUANT=quant,
        enable_fp_fusion=False,  # round the scaled values as the reference does
    )  # fmt: skip


def store_kvcache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    scales: torch.Tensor | None = None,
) -> None:
    """Store k, v [N, Hkv, D] into the paged caches at slot_mapping (-1 skips): Triton on CUDA."""
    fn = store_kvcache_triton if use_triton(k) else store_kvcache_ref
    fn(k, v, k_cache, v_cache, slot_mapping, scales)
