"""Mixed attention (decode kernel for one-query sequences, varlen prefill for the rest, one
output) against the varlen reference, as a mixed CUDA graph's step stages it."""

import pytest
import torch

from kiln.kernels.common import PagedKV
from kiln.kernels.kv_quant import layer_scales, quantize_ref
from kiln.kernels.mixed_attention import mixed_attention_ref, mixed_attention_triton
from kiln.kernels.paged_decode_attention import paged_decode_attention_triton
from kiln.kernels.varlen_prefill_attention import varlen_prefill_attention_triton


def packed(q_lens, device):
    return torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32).to(device)


@pytest.fixture
def compare(device, check, poisoned, paged_kv):
    """compare(q_lens, context_lens, Hq, Hkv, D, dtype, block_size, **kw): kernel == reference."""

    def run(q_lens, context_lens, num_heads, num_kv_heads, head_dim, dtype, block_size, **kw):
        k_cache, v_cache, tables = paged_kv(context_lens, block_size, num_kv_heads, head_dim, dtype)
        q = torch.randn(sum(q_lens), num_heads, head_dim, dtype=dtype, device=device)
        lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
        args = (q, PagedKV(k_cache, v_cache, tables, lens), packed(q_lens, device), head_dim**-0.5)
        got = poisoned(mixed_attention_triton, *args, **kw)
        kw.pop("num_splits", None)
        check(got, mixed_attention_ref(*args, **kw))

    return run


@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_decodes_then_chunks_match_reference(compare, dtype, num_splits):
    # decodes first (as the engine orders them), then a fresh prompt, a chunk after a prefix
    compare([1, 1, 1, 19, 7], [1, 13, 37, 19, 30], 4, 2, 32, dtype, 4, num_splits=num_splits)


def test_any_order_and_a_one_token_chunk_match_reference(compare):
    # a one-query chunk (a prefix hit's last token) is a decode; a sequence without queries
    compare([6, 1, 0, 1, 17], [6, 40, 9, 1, 20], 6, 2, 64, torch.float32, 8, num_splits=2)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_sliding_window_matches_reference(compare, num_splits):
    kw = dict(sliding_window=8, num_splits=num_splits)
    compare([1, 1, 12, 1], [3, 30, 41, 17], 4, 1, 32, torch.float32, 4, **kw)


def test_only_decodes_or_only_chunks_match_reference(compare):
    compare([1, 1, 1], [5, 21, 2], 4, 2, 32, torch.float32, 4)
    compare([3, 9], [5, 21], 4, 2, 32, torch.float32, 4)


@pytest.mark.parametrize("pad_tokens", [0, 21])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_padded_as_a_mixed_graph_stages_it(device, check, paged_kv, pad_tokens, num_splits):
    """Empty padded sequences (cu_seqlens repeats the real token count, context 0, table
    row 0) and padded tokens owned by no sequence: the real rows match the reference, and
    neither kernel writes a padded row."""
    q_lens, context_lens = [1, 1, 19, 7], [9, 30, 19, 20]
    k_cache, v_cache, tables = paged_kv(context_lens, 4, 2, 32, torch.float32)
    n, pad_seqs = sum(q_lens), 5
    q = torch.randn(n + pad_tokens, 4, 32, device=device)
    cu = torch.cat([packed(q_lens, device), torch.full((pad_seqs,), n, device=device)]).int()
    lens = torch.tensor(context_lens + [0] * pad_seqs, dtype=torch.int32, device=device)
    padded_tables = torch.cat([tables, torch.zeros_like(tables[:1]).expand(pad_seqs, -1)])
    out = torch.full_like(q, float("nan"))
    decode_out = paged_decode_attention_triton(
        q, PagedKV(k_cache, v_cache, padded_tables, lens), 32**-0.5, None, num_splits,
        cu_seqlens_q=cu, out=out,
    )  # fmt: skip
    got = varlen_prefill_attention_triton(
        q, PagedKV(k_cache, v_cache, padded_tables, lens), cu, 32**-0.5, out=decode_out,
        skip_single=True,
    )  # fmt: skip
    assert got is out and out[n:].isnan().all()
    real = PagedKV(k_cache, v_cache, tables, lens[: len(q_lens)])
    check(got[:n], mixed_attention_ref(q[:n], real, packed(q_lens, device), 32**-0.5))


def test_each_kernel_writes_only_its_own_rows(device, paged_kv):
    """The decode kernel writes the one-query rows only, the prefill kernel the others only."""
    q_lens, context_lens = [1, 5, 1, 3], [7, 5, 12, 9]
    k_cache, v_cache, tables = paged_kv(context_lens, 4, 2, 32, torch.float32)
    q = torch.randn(sum(q_lens), 4, 32, device=device)
    kv = PagedKV(k_cache, v_cache, tables, torch.tensor(context_lens, dtype=torch.int32))
    cu = packed(q_lens, device)
    single = torch.tensor([True, False, False, False, False, False, True, False, False, False])
    out = torch.full_like(q, float("nan"))
    paged_decode_attention_triton(q, kv, 32**-0.5, cu_seqlens_q=cu, out=out)
    assert not out[single].isnan().any() and out[~single].isnan().all()
    out = torch.full_like(q, float("nan"))
    varlen_prefill_attention_triton(q, kv, cu, 32**-0.5, out=out, skip_single=True)
    assert out[single].isnan().all() and not out[~single].isnan().any()


@pytest.mark.parametrize("qdtype", [torch.float8_e4m3fn, torch.int8], ids=str)
def test_quantized_cache_matches_reference(device, check, paged_kv, qdtype):
    q_lens, context_lens = [1, 1, 11], [17, 5, 30]
    k, v, tables = paged_kv(context_lens, 4, 2, 32, torch.float32)
    scale = torch.tensor([0.05, 0.07], device=device)
    k_q, v_q = quantize_ref(k, 1 / scale, qdtype), quantize_ref(v, 1 / scale, qdtype)
    scales = layer_scales(scale, scale)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
    kv = PagedKV(k_q, v_q, tables, lens, scales=scales)
    q = torch.randn(sum(q_lens), 4, 32, device=device)
    args = (q, kv, packed(q_lens, device), 32**-0.5)
    check(mixed_attention_triton(*args, num_splits=2), mixed_attention_ref(*args))


def test_attention_mass_matches_reference(device, paged_kv):
    """H2O: each key's attention mass from the decode rows and the chunks, as the reference
    adds it (every query's mass sums to its head count)."""
    q_lens, context_lens = [1, 1, 9], [13, 37, 20]
    k, v, tables = paged_kv(context_lens, 8, 2, 32, torch.float32)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
    q = torch.randn(sum(q_lens), 4, 32, device=device)
    got, want = (torch.zeros(k.shape[:2], device=device) for _ in range(2))
    args = (packed(q_lens, device), 32**-0.5)
    mixed_attention_triton(q, PagedKV(k, v, tables, lens, scores=got), *args)
    mixed_attention_ref(q, PagedKV(k, v, tables, lens, scores=want), *args)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(want.sum(), torch.tensor(4.0 * sum(q_lens)))


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_mixed_at_real_sizes(compare, head_dim):
    """A served step's shape: 250 decodes of mixed lengths beside two prompt chunks."""
    lens = torch.randint(1, 2048, (250,)).tolist()
    q_lens, context_lens = [1] * 250 + [256, 517], lens + [256, 1517]
    compare(q_lens, context_lens, 16, 8, head_dim, torch.bfloat16, 16)
    compare(q_lens[:3] + q_lens[-2:], context_lens[:3] + context_lens[-2:], 16, 8, head_dim,
            torch.bfloat16, 16, sliding_window=300)  # fmt: skip
