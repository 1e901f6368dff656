"""The one-launch decode step (qkv -> norm, RoPE, K/V store, split-KV attention, merge)
against the unfused sequence it replaces."""

import dataclasses

import pytest
import torch

from kiln.engine.attention import AttentionMetadata, KVCache, PagedBackend
from kiln.engine.ops import Ops
from kiln.kernels.common import HeadLayout, PagedKV, QKNormRope
from kiln.kernels.decode_qkv import paged_decode_qkv, paged_decode_qkv_ref, paged_decode_qkv_triton
from kiln.kernels.paged_decode_attention import (
    _COUNTERS,
    paged_decode_attention_ref,
    paged_decode_attention_triton,
)
from kiln.kernels.qkv_prepare import qkv_prepare_triton

EPS = 1e-6


def _make_step(
    paged_kv, context_lens, num_heads, num_kv_heads, head_dim, dtype, device, *,
    block_size=16, norm=True, rope=True, padding=(),
):  # fmt: skip
    """A decode step's inputs as a dict of paged_decode_qkv's arguments: each sequence's new
    token at position context_len - 1 goes to its slot; rows in `padding` are CUDA-graph
    padding (slot -1). The caches (in step["kv"]) hold random values, the blocks in scattered
    order."""
    k_cache, v_cache, tables = paged_kv(context_lens, block_size, num_kv_heads, head_dim, dtype)
    lens = torch.tensor(context_lens, device=device)
    last = lens - 1
    slots = tables.long().gather(1, (last // block_size)[:, None])[:, 0] * block_size
    slots += last % block_size
    slots[list(padding)] = -1
    max_pos = max(context_lens)
    cos_sin = None
    if rope:
        freqs = torch.outer(torch.arange(max_pos).float(), torch.rand(head_dim // 2) * 0.5)
        cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)
    q_w = k_w = None
    if norm:
        q_w, k_w = torch.randn(2, head_dim, dtype=dtype, device=device)
    heads = HeadLayout(num_heads, num_kv_heads, head_dim)
    return dict(
        qkv=torch.randn(len(context_lens), heads.qkv_width, dtype=dtype, device=device),
        positions=last,
        heads=heads,
        qk=QKNormRope(q_w, k_w, EPS, cos_sin),
        kv=PagedKV(k_cache, v_cache, tables, lens.int(), slots),
        scale=head_dim**-0.5,
    )


def _call(fn, step, **kwargs):
    """fn on copies of the step's caches: (output, k_cache, v_cache)."""
    kv = step["kv"]
    k_cache, v_cache = kv.k_cache.clone(), kv.v_cache.clone()
    kv = dataclasses.replace(kv, k_cache=k_cache, v_cache=v_cache)
    out = fn(**{**step, "kv": kv}, **kwargs)
    return out, k_cache, v_cache


def _prepare_triton(step):
    """Unfused Triton qkv_prepare on the step: (q, k_cache, v_cache)."""
    return _call(qkv_prepare_triton, {k: v for k, v in step.items() if k != "scale"})


def _assert_like_reference(check, step, fn=paged_decode_qkv_triton, **kwargs):
    """Output within tolerance of the reference's; the caches bit-identical to what
    qkv_prepare_triton leaves (and on CUDA, where that is bit-exact, to the reference's)."""
    out, k_cache, v_cache = _call(fn, step, **kwargs)
    kwargs.pop("pdl", None)
    kwargs.pop("last_reduces", None)
    want, k_want, v_want = _call(paged_decode_qkv_ref, step, **kwargs)
    check(out, want)
    _, k_prep, v_prep = _prepare_triton(step)
    assert torch.equal(k_cache, k_prep) and torch.equal(v_cache, v_prep)
    assert torch.equal(v_cache, v_want)
    if k_cache.is_cuda:  # on CPU, torch sums the norms' squares in another order
        assert torch.equal(k_cache, k_want)
    return out


def _counters_are_zero():
    return all(int(b.abs().sum()) == 0 for bufs in _COUNTERS.values() for b in bufs)


# Interpreter tiles are 16 tokens, the blocks 16 or 8: these cross tile and block boundaries.
LENS = [1, 16, 17, 40, 70]


@pytest.mark.parametrize("last_reduces", [False, True], ids=["reduce-kernel", "last-reduces"])
@pytest.mark.parametrize("num_splits", [1, 2, 3, None])
def test_decode_qkv_gqa_matches_reference(paged_kv, dtype, device, check, num_splits, last_reduces):
    step = _make_step(paged_kv, LENS, 4, 2, 64, dtype, device, padding=[0])
    _assert_like_reference(check, step, num_splits=num_splits, last_reduces=last_reduces)


@pytest.mark.parametrize("head_dim,block_size", [(64, 8), (128, 16)])
def test_decode_qkv_mha_matches_reference(paged_kv, device, check, head_dim, block_size):
    step = _make_step(paged_kv, LENS, 2, 2, head_dim, torch.bfloat16, device, block_size=block_size)
    _assert_like_reference(check, step, num_splits=2)


@pytest.mark.parametrize("norm,rope", [(False, True), (False, False), (True, False)])
def test_decode_qkv_without_norm_or_rope(paged_kv, device, check, norm, rope):
    step = _make_step(paged_kv, LENS, 4, 2, 64, torch.float32, device, norm=norm, rope=rope)
    _assert_like_reference(check, step, num_splits=2)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_qkv_sliding_window(paged_kv, device, check, num_splits):
    step = _make_step(paged_kv, [3, 30, 70], 4, 2, 64, torch.float32, device, padding=[1])
    _assert_like_reference(check, step, sliding_window=20, num_splits=num_splits)
    kw = dict(sliding_window=20, num_splits=num_splits, last_reduces=True)
    _assert_like_reference(check, step, **kw)


def test_decode_qkv_more_splits_than_tokens(paged_kv, device, check):
    step = _make_step(paged_kv, [2, 17, 1], 4, 2, 64, torch.float32, device, padding=[2])
    _assert_like_reference(check, step, num_splits=8)
    _assert_like_reference(check, step, num_splits=8, last_reduces=True)


def test_decode_qkv_empty_context_stores_and_gives_zeros(paged_kv, device, check):
    step = _make_step(paged_kv, [1, 20], 4, 2, 64, torch.float32, device)
    step["kv"].context_lens[0] = 0  # its slot is still written, as qkv_prepare writes it
    out = _assert_like_reference(check, step, num_splits=2)
    assert not out[0].any()


def test_decode_qkv_twice_gives_the_same_and_resets_the_counters(paged_kv, device):
    step = _make_step(paged_kv, LENS, 4, 2, 64, torch.float32, device, padding=[2])
    first = _call(paged_decode_qkv_triton, step, num_splits=4, last_reduces=True)
    assert _counters_are_zero()
    second = _call(paged_decode_qkv_triton, step, num_splits=4, last_reduces=True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert _counters_are_zero()


def test_decode_qkv_pdl_is_a_plain_launch_off_hopper(paged_kv, device, check):
    step = _make_step(paged_kv, LENS, 4, 2, 64, torch.float32, device, padding=[0])
    _assert_like_reference(check, step, num_splits=2, pdl=True)


def test_decode_qkv_dispatches(paged_kv, device):
    step = _make_step(paged_kv, LENS, 4, 2, 64, torch.float32, device)
    fn = paged_decode_qkv_triton if device == "cuda" else paged_decode_qkv_ref
    for got, want in zip(_call(paged_decode_qkv, step), _call(fn, step)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_last_block_reduces(paged_kv, device, check, num_splits):
    """paged_decode_attention_triton merging its splits in the attention kernel itself."""
    k_cache, v_cache, tables = paged_kv(LENS, 8, 2, 32, torch.float32)
    q = torch.randn(len(LENS), 4, 32, device=device)
    lens = torch.tensor(LENS, dtype=torch.int32, device=device)
    args = (q, PagedKV(k_cache, v_cache, tables, lens), 32**-0.5, 24)
    got = paged_decode_attention_triton(*args, num_splits=num_splits, last_reduces=True)
    check(got, paged_decode_attention_ref(*args))
    again = paged_decode_attention_triton(*args, num_splits=num_splits, last_reduces=True)
    assert torch.equal(got, again) and _counters_are_zero()


def _backend_step(backend, step):
    """Point the backend at a decode-only step over the step's caches (as layer 0)."""
    kv = step["kv"]
    backend.kv_cache.data[0, 0] = kv.k_cache
    backend.kv_cache.data[1, 0] = kv.v_cache
    n = step["qkv"].shape[0]
    backend.set_metadata(
        AttentionMetadata(
            positions=step["positions"],
            slot_mapping=kv.slot_mapping,
            block_tables=kv.block_tables,
            context_lens=kv.context_lens,
            cu_seqlens_q=torch.arange(n + 1, dtype=torch.int32, device=step["qkv"].device),
            num_decodes=n,
            query_lens=[1] * n,
        )
    )


def _attend_qkv(backend, step, sliding_window=None):
    args = (step["qkv"], step["positions"], step["heads"], step["qk"], step["scale"])
    return backend.attend_qkv(0, *args, sliding_window)


def _cache_for(step) -> KVCache:
    k = step["kv"].k_cache
    return KVCache(1, k.shape[0], k.shape[1], k.shape[2], k.shape[3], k.dtype, k.device)


@pytest.mark.parametrize("sliding_window", [None, 20])
def test_backends_agree_on_a_decode_only_step(paged_kv, device, check, sliding_window):
    step = _make_step(paged_kv, LENS, 4, 2, 64, torch.float32, device, padding=[0])
    outs, caches = [], []
    for name in ("torch", "triton"):
        backend = PagedBackend(_cache_for(step), getattr(Ops, name)())
        _backend_step(backend, step)
        outs.append(_attend_qkv(backend, step, sliding_window))
        caches.append(backend.kv_cache.data)
    check(outs[1], outs[0])
    assert torch.equal(caches[1][1], caches[0][1])  # v: copied
    check(caches[1][0], caches[0][0])


def test_backend_fuses_decode_only_steps_and_nothing_else(paged_kv, device, check):
    calls = []

    def decode_qkv(*args):
        calls.append(args[0].shape[0])
        return paged_decode_qkv_ref(*args)

    step = _make_step(paged_kv, LENS, 4, 2, 64, torch.float32, device)
    ops = dataclasses.replace(Ops.torch(), paged_decode_qkv=decode_qkv)
    backend = PagedBackend(_cache_for(step), ops)
    _backend_step(backend, step)
    want = _attend_qkv(backend, step)
    assert calls == [len(LENS)]
    _backend_step(backend, step)
    md = backend.metadata
    md.num_decodes -= 1  # the last sequence as a one-token prefill chunk: a mixed step
    backend.set_metadata(md)
    check(_attend_qkv(backend, step), want)
    assert calls == [len(LENS)]


@pytest.mark.parametrize(
    "name,windows,fused_qkv",
    [("torch", {None, 8}, (True, True)), ("torch", {None}, (False, False)),
     ("triton", {None}, (True, False))],
)  # fmt: skip
def test_compile_kernels_runs_the_decode_qkv_variants(name, windows, fused_qkv):
    """The start-up compile pass calls decode_qkv well formed, storing nothing."""
    cache = KVCache(2, 4, 16, 2, 32, torch.float32, "cpu")
    before = cache.data.clone()
    backend = PagedBackend(cache, getattr(Ops, name)())
    backend.compile_kernels(4, windows, max_num_seqs=2, fused_qkv=fused_qkv)
    assert torch.equal(cache.data, before)


# ---------------------------------------------------------------- real sizes (CUDA only)


def _qwen3_step(paged_kv, batch, max_len, norm=True):
    lens = torch.randint(1, max_len + 1, (batch,)).tolist()
    lens[0] = max_len
    padding = [batch - 1] if batch > 1 else []
    return _make_step(
        paged_kv, lens, 16, 8, 128, torch.bfloat16, "cuda", norm=norm, padding=padding
    )


@pytest.mark.gpu
@pytest.mark.parametrize("last_reduces", [False, True], ids=["reduce-kernel", "last-reduces"])
@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("batch,max_len", [(1, 4096), (1, 300), (64, 4096), (64, 200)])
def test_decode_qkv_at_qwen3_sizes(paged_kv, check, batch, max_len, pdl, last_reduces):
    """Hq 16, Hkv 8, D 128, bfloat16: stored K/V bit-exact, output within tolerance."""
    step = _qwen3_step(paged_kv, batch, max_len)
    kw = dict(pdl=pdl, last_reduces=last_reduces)
    got = _assert_like_reference(check, step, **kw)
    _assert_like_reference(check, step, sliding_window=1000, **kw)
    _assert_like_reference(check, step, num_splits=1, **kw)
    _assert_like_reference(check, step, num_splits=16, **kw)
    for _ in range(10):  # the merge order is fixed: whichever program merges, bit-identical
        again = _call(paged_decode_qkv_triton, step, **kw)[0]
        assert torch.equal(got, again) and _counters_are_zero()


@pytest.mark.gpu
@pytest.mark.parametrize("norm", [True, False])
def test_decode_qkv_matches_the_unfused_triton_ops(paged_kv, check, norm):
    step = _qwen3_step(paged_kv, 8, 2048, norm=norm)
    out = _call(paged_decode_qkv_triton, step, num_splits=8)[0]
    q, k_cache, v_cache = _prepare_triton(step)
    kv = dataclasses.replace(step["kv"], k_cache=k_cache, v_cache=v_cache)
    unfused = paged_decode_attention_triton(q, kv, step["scale"], num_splits=8)
    check(out, unfused)


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, True])
def test_decode_qkv_in_a_cuda_graph(paged_kv, pdl):
    """Captured once, replayed on new inputs: the same as eager calls (the counters stay 0)."""
    step = _qwen3_step(paged_kv, 4, 4096)
    kv = step["kv"]
    k_cache, v_cache = kv.k_cache.clone(), kv.v_cache.clone()
    graph_step = {**step, "kv": dataclasses.replace(kv, k_cache=k_cache, v_cache=v_cache)}
    kw = dict(pdl=pdl, last_reduces=True)
    paged_decode_qkv_triton(**graph_step, **kw)  # compile and allocate outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_qkv_triton(**graph_step, **kw)
    for _ in range(3):
        step["qkv"].normal_()
        k_cache.copy_(kv.k_cache)
        v_cache.copy_(kv.v_cache)
        graph.replay()
        want, k_want, v_want = _call(paged_decode_qkv_triton, step, **kw)
        torch.cuda.synchronize()
        assert torch.equal(out, want) and torch.equal(k_cache, k_want)
        assert torch.equal(v_cache, v_want) and _counters_are_zero()
