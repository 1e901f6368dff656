"""Paged decode attention (split-KV, GQA, sliding window) against the torch reference."""

import pytest
import torch

from kiln.kernels.common import PagedKV
from kiln.kernels.paged_decode_attention import (
    choose_num_splits,
    paged_decode_attention_ref,
    paged_decode_attention_triton,
)


@pytest.fixture
def compare(device, check, poisoned, paged_kv):
    """compare(context_lens, Hq, Hkv, D, dtype, block_size, **kwargs): kernel == reference."""

    def run(context_lens, num_heads, num_kv_heads, head_dim, dtype, block_size, **kwargs):
        k_cache, v_cache, tables = paged_kv(context_lens, block_size, num_kv_heads, head_dim, dtype)
        q = torch.randn(len(context_lens), num_heads, head_dim, dtype=dtype, device=device)
        lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
        args = (q, PagedKV(k_cache, v_cache, tables, lens), head_dim**-0.5)
        got = poisoned(paged_decode_attention_triton, *args, **kwargs)
        kwargs.pop("num_splits", None)
        check(got, paged_decode_attention_ref(*args, **kwargs))

    return run


@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_decode_gqa_matches_reference(compare, dtype, num_splits):
    compare([1, 13, 37], 4, 2, 32, dtype, block_size=4, num_splits=num_splits)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (6, 1)])
def test_decode_mha_and_odd_groups_match_reference(compare, num_heads, num_kv_heads):
    compare([5, 21], num_heads, num_kv_heads, 64, torch.float32, block_size=8, num_splits=2)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_sliding_window_matches_reference(compare, num_splits):
    compare([3, 30, 41], 4, 2, 32, torch.float32, 4, sliding_window=8, num_splits=num_splits)


def test_more_splits_than_tokens_gives_the_same_output(compare):
    compare([2, 7], 4, 2, 32, torch.float32, block_size=4, num_splits=8)


def test_num_splits_grows_when_the_gpu_would_idle():
    device = torch.device("cpu")  # 4 pretend SMs
    assert choose_num_splits(1, 1, 8192, device) == 8
    assert choose_num_splits(1, 1, 300, device) == 2  # at least 256 tokens a split
    assert choose_num_splits(64, 8, 8192, device) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("batch,max_len", [(1, 8192), (32, 2048), (256, 1024)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_at_real_sizes(compare, batch, max_len, head_dim):
    lens = torch.randint(1, max_len + 1, (batch,)).tolist()
    lens[0] = max_len
    compare(lens, 16, 8, head_dim, torch.bfloat16, block_size=16)
    compare(lens, 16, 8, head_dim, torch.bfloat16, block_size=16, sliding_window=1000)
