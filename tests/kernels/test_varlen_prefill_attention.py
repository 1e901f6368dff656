"""Varlen paged prefill attention (chunks, prefix hits, windows) against the torch reference."""

import pytest
import torch

from kiln.kernels.common import PagedKV
from kiln.kernels.varlen_prefill_attention import (
    varlen_prefill_attention_ref,
    varlen_prefill_attention_triton,
)


@pytest.fixture
def compare(device, check, poisoned, paged_kv):
    """compare(q_lens, context_lens, Hq, Hkv, D, dtype, block_size, **kw): kernel == reference.

    Sequence b's queries are the last q_lens[b] of its context_lens[b] tokens.
    """

    def run(q_lens, context_lens, num_heads, num_kv_heads, head_dim, dtype, block_size, **kw):
        k_cache, v_cache, tables = paged_kv(context_lens, block_size, num_kv_heads, head_dim, dtype)
        q = torch.randn(sum(q_lens), num_heads, head_dim, dtype=dtype, device=device)
        cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
        lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
        args = (q, PagedKV(k_cache, v_cache, tables, lens), cu.to(device), head_dim**-0.5)
        got = poisoned(varlen_prefill_attention_triton, *args, **kw)
        check(got, varlen_prefill_attention_ref(*args, **kw))

    return run


def test_prefill_fresh_prompts_match_reference(compare, dtype):
    compare([5, 1, 19], [5, 1, 19], 4, 2, 32, dtype, block_size=4)


def test_prefill_chunks_after_cached_prefix_match_reference(compare, dtype):
    # a chunk after a prefix hit, a decode-like single query, a chunk across tile boundaries
    compare([7, 1, 18], [20, 9, 53], 4, 2, 32, dtype, block_size=8)


def test_prefill_sliding_window_matches_reference(compare):
    compare([17, 6], [17, 40], 4, 1, 64, torch.float32, block_size=4, sliding_window=5)


def test_prefill_sequence_without_queries_is_skipped(compare):
    compare([4, 0, 3], [4, 9, 3], 2, 2, 32, torch.float32, block_size=4)


@pytest.mark.parametrize("pad_tokens", [0, 21])
def test_prefill_padded_as_a_mixed_graph_stages_it(device, check, paged_kv, pad_tokens):
    """A mixed CUDA graph's step (kiln.engine.cuda_graphs): decodes and chunks as sequences,
    then empty padded sequences (cu_seqlens repeats the real token count, context 0, table
    row 0) and padded tokens owned by no sequence; the real rows match the reference."""
    q_lens, context_lens = [1, 1, 19, 7], [9, 30, 19, 20]
    k_cache, v_cache, tables = paged_kv(context_lens, 4, 2, 32, torch.float32)
    n, pad_seqs = sum(q_lens), 5
    q = torch.randn(n + pad_tokens, 4, 32, device=device)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()] + [n] * pad_seqs)
    lens = torch.tensor(context_lens + [0] * pad_seqs, dtype=torch.int32, device=device)
    padded_tables = torch.cat([tables, torch.zeros_like(tables[:1]).expand(pad_seqs, -1)])
    padded = PagedKV(k_cache, v_cache, padded_tables, lens)
    got = varlen_prefill_attention_triton(q, padded, cu.int().to(device), 32**-0.5)[:n]
    real, real_cu = PagedKV(k_cache, v_cache, tables, lens[: len(q_lens)]), cu[: len(q_lens) + 1]
    check(got, varlen_prefill_attention_ref(q[:n], real, real_cu.int().to(device), 32**-0.5))


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_at_real_sizes(compare, head_dim):
    q_lens, context_lens = [1024, 517, 300, 1], [1024, 1517, 300, 2049]
    compare(q_lens, context_lens, 16, 8, head_dim, torch.bfloat16, block_size=16)
    kw = dict(sliding_window=256)
    compare(q_lens, context_lens, 16, 8, head_dim, torch.bfloat16, block_size=16, **kw)
