"""The KV store kernel writes exactly the reference's slots and nothing else."""

import pytest
import torch

from kiln.kernels.store_kvcache import store_kvcache_ref, store_kvcache_triton


def _assert_stores_like_reference(num_tokens, num_blocks, block_size, num_kv_heads, head_dim,
                                  dtype, slot_dtype, device):  # fmt: skip
    k = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn_like(k)
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[::3] = -1  # padding tokens: not stored
    slots = slots.to(slot_dtype).to(device)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    # NaN everywhere first: a slot written by one and not the other shows up
    caches = [torch.full(shape, float("nan"), dtype=dtype, device=device) for _ in range(4)]
    store_kvcache_triton(k, v, caches[0], caches[1], slots)
    store_kvcache_ref(k, v, caches[2], caches[3], slots)
    for got, want in zip(caches[:2], caches[2:]):
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_store_kvcache_matches_reference(dtype, device, slot_dtype):
    _assert_stores_like_reference(7, 5, 4, 3, 32, dtype, slot_dtype, device)


@pytest.mark.gpu
def test_store_kvcache_at_qwen3_sizes():
    _assert_stores_like_reference(4099, 512, 16, 8, 128, torch.bfloat16, torch.int32, "cuda")
