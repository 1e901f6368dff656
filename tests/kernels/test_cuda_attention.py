"""The CUDA C++ paged decode attention against the torch reference (GPU), and its clean refusal
where there is no CUDA device."""

import pytest
import torch

from kiln.errors import ConfigError
from kiln.kernels.common import PagedKV
from kiln.kernels.cuda_attention import (
    choose_tokens_per_split,
    cuda_extension_available,
    load_extension,
    paged_decode_attention_cuda,
)
from kiln.kernels.paged_decode_attention import paged_decode_attention_ref


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_a_cuda_device_the_build_is_refused():
    assert not cuda_extension_available()
    with pytest.raises(ConfigError, match="CUDA device"):
        load_extension()


def test_splits_fill_the_device_and_fit_shared_memory():
    cpu = torch.device("cpu")  # 4 pretend SMs
    assert choose_tokens_per_split(1, 32, 8, 8192, cpu) == 1024  # shared memory caps a split
    assert choose_tokens_per_split(1, 8, 1, 512, cpu) == 256  # at least 256 keys a split
    assert choose_tokens_per_split(64, 32, 8, 1024, cpu) == 1024  # enough blocks already


@pytest.fixture
def compare(check, paged_kv):
    """compare(context_lens, Hq, Hkv, D, dtype, block_size, **kwargs): kernel == reference."""
    if not cuda_extension_available():
        pytest.skip("needs a CUDA device and nvcc")

    def run(context_lens, num_heads, num_kv_heads, head_dim, dtype, block_size, **kwargs):
        k_cache, v_cache, tables = paged_kv(context_lens, block_size, num_kv_heads, head_dim, dtype)
        q = torch.randn(len(context_lens), num_heads, head_dim, dtype=dtype, device="cuda")
        lens = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
        args = (q, PagedKV(k_cache, v_cache, tables, lens), head_dim**-0.5)
        window = kwargs.get("sliding_window")
        check(
            paged_decode_attention_cuda(*args, **kwargs), paged_decode_attention_ref(*args, window)
        )

    return run


@pytest.mark.gpu
@pytest.mark.parametrize("tokens_per_split", [None, 8])
def test_cuda_decode_gqa_matches_reference(compare, dtype, tokens_per_split):
    compare([1, 13, 37, 0], 4, 2, 32, dtype, block_size=4, tokens_per_split=tokens_per_split)


@pytest.mark.gpu
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (6, 1), (32, 2)])
@pytest.mark.parametrize("head_dim", [16, 64, 128, 256])
def test_cuda_decode_head_layouts_match_reference(compare, num_heads, num_kv_heads, head_dim):
    compare([5, 21, 70], num_heads, num_kv_heads, head_dim, torch.bfloat16, 8, tokens_per_split=16)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens_per_split", [None, 4])
def test_cuda_decode_sliding_window_matches_reference(compare, tokens_per_split):
    compare([3, 30, 41], 4, 2, 32, torch.float32, 4, sliding_window=8,
            tokens_per_split=tokens_per_split)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("batch,max_len", [(1, 8192), (32, 2048), (256, 1024)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_decode_at_real_sizes(compare, batch, max_len, head_dim):
    lens = torch.randint(1, max_len + 1, (batch,)).tolist()
    lens[0] = max_len
    compare(lens, 32, 8, head_dim, torch.bfloat16, block_size=16)
    compare(lens, 32, 8, head_dim, torch.float16, block_size=16, sliding_window=1000)
