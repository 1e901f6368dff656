"""The quantized KV cache (fp8 e4m3, int8): the kernels' stores and loads against the torch
references, and the references against full-precision attention."""

import dataclasses

import pytest
import torch

from kiln.kernels.common import HeadLayout, PagedKV, QKNormRope
from kiln.kernels.decode_qkv import paged_decode_qkv_ref, paged_decode_qkv_triton
from kiln.kernels.kv_quant import dequantize_ref, layer_scales, quantize_ref
from kiln.kernels.paged_decode_attention import (
    paged_decode_attention_ref,
    paged_decode_attention_triton,
)
from kiln.kernels.qkv_prepare import qkv_prepare_ref, qkv_prepare_triton
from kiln.kernels.store_kvcache import store_kvcache_ref, store_kvcache_triton
from kiln.kernels.varlen_prefill_attention import (
    varlen_prefill_attention_ref,
    varlen_prefill_attention_triton,
)

QDTYPES = [torch.float8_e4m3fn, torch.int8]


@pytest.fixture(params=QDTYPES, ids=["fp8", "int8"])
def qdtype(request):
    return request.param


def _scales(num_kv_heads, device):
    """Per-head k and v scales of different sizes: [4, Hkv]."""
    k_scale = torch.rand(num_kv_heads) * 0.02 + 0.005
    v_scale = torch.rand(num_kv_heads) * 0.02 + 0.005
    return layer_scales(k_scale, v_scale).to(device)


def _quantized_kv(paged_kv, context_lens, block_size, num_kv_heads, head_dim, qdtype, device):
    """A random paged cache stored as qdtype, with its scales: (PagedKV without lens, full
    precision k and v caches it was quantized from, tables)."""
    k, v, tables = paged_kv(context_lens, block_size, num_kv_heads, head_dim, torch.float32)
    scales = _scales(num_kv_heads, device)
    kq, vq = quantize_ref(k, scales[2], qdtype), quantize_ref(v, scales[3], qdtype)
    return kq, vq, scales, tables


def _assert_within_one_step(got: torch.Tensor, want: torch.Tensor, max_share=0.02):
    """Stored values equal, except a few that differ by one step of the format's grid (the
    inputs were rounded differently on the way: float32 sums in another order)."""
    g, w = got.float(), want.float()
    diff = (g - w).abs()
    step = torch.maximum(g.abs(), w.abs()) / 8 + 2**-9 if got.dtype != torch.int8 else 1.0
    assert (diff <= step).all()
    assert (diff > 0).float().mean() <= max_share


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_store_matches_reference_exactly(qdtype, dtype, device):
    n, num_kv_heads, head_dim = 9, 3, 32
    k = torch.randn(n, num_kv_heads, head_dim, dtype=dtype, device=device) * 3
    v = torch.randn_like(k)
    slots = torch.randperm(6 * 4)[:n].to(device)
    slots[::3] = -1
    scales = _scales(num_kv_heads, device)
    prior = torch.randn(6, 4, num_kv_heads, head_dim) * 100  # what must stay untouched
    caches = [prior.to(qdtype).to(device) for _ in range(4)]
    store_kvcache_triton(k, v, caches[0], caches[1], slots, scales)
    store_kvcache_ref(k, v, caches[2], caches[3], slots, scales)
    for got, want in zip(caches[:2], caches[2:]):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_quantize_rounds_ties_to_even_and_saturates(qdtype, device):
    """Grid midpoints, an exponent carry (124.5 -> 128 in e4m3), fp8 subnormals, values past
    the largest one: the kernel rounds each as torch does."""
    edge = [0.0, -0.0, 0.5, 1.5, 2.5, -2.5, 1.0625, 1.1875, 124.5, 126.0, 447.0, 460.0, 1e6,
            -1e6, 2**-9, 3 * 2**-10, 2**-12, 100.5, 101.5, -126.9, 127.6]  # fmt: skip
    x = torch.tensor(edge).view(-1, 1, 1).expand(-1, 1, 16).contiguous().to(device)
    ones = layer_scales(torch.ones(1), torch.ones(1)).to(device)
    slots = torch.arange(len(edge), device=device)
    caches = [torch.zeros(len(edge), 1, 1, 16, dtype=qdtype, device=device) for _ in range(4)]
    store_kvcache_triton(x, x, caches[0], caches[1], slots, ones)
    store_kvcache_ref(x, x, caches[2], caches[3], slots, ones)
    assert torch.equal(caches[0].view(torch.uint8), caches[2].view(torch.uint8))
    want = x.clamp(-448, 448).to(qdtype) if qdtype != torch.int8 else x.clamp(-127, 127).round()
    assert torch.equal(caches[2][:, 0].float(), want.float())


@pytest.mark.parametrize("num_splits", [1, 3])
def test_quantized_decode_matches_reference(qdtype, paged_kv, device, check, num_splits):
    lens = [1, 13, 37]
    kq, vq, scales, tables = _quantized_kv(paged_kv, lens, 4, 2, 32, qdtype, device)
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(len(lens), 4, 32, dtype=dtype, device=device)
        kv = PagedKV(kq, vq, tables, torch.tensor(lens, dtype=torch.int32, device=device))
        kv = dataclasses.replace(kv, scales=scales)
        got = paged_decode_attention_triton(q, kv, 32**-0.5, num_splits=num_splits)
        check(got, paged_decode_attention_ref(q, kv, 32**-0.5))


@pytest.mark.parametrize("sliding_window", [None, 8])
def test_quantized_prefill_matches_reference(qdtype, paged_kv, device, check, sliding_window):
    context_lens, q_lens = [5, 40, 17], [5, 20, 1]
    kq, vq, scales, tables = _quantized_kv(paged_kv, context_lens, 8, 2, 32, qdtype, device)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
    kv = PagedKV(kq, vq, tables, lens, scales=scales)
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(sum(q_lens), 4, 32, dtype=dtype, device=device)
        args = (q, kv, cu.to(device), 32**-0.5, sliding_window)
        check(varlen_prefill_attention_triton(*args), varlen_prefill_attention_ref(*args))


def test_quantized_reference_is_close_to_full_precision(qdtype, paged_kv, device):
    """Attention over the fp8 / int8 copy of a cache stays near attention over the original
    (scales from each head's amax, as the engine calibrates them)."""
    lens = [64, 200]
    k, v, tables = paged_kv(lens, 16, 2, 64, torch.float32)
    qmax = 448.0 if qdtype != torch.int8 else 127.0
    k_scale, v_scale = k.abs().amax((0, 1, 3)) / qmax, v.abs().amax((0, 1, 3)) / qmax
    scales = layer_scales(k_scale, v_scale).to(device)
    q = torch.randn(len(lens), 4, 64, device=device)
    ctx = torch.tensor(lens, dtype=torch.int32, device=device)
    exact = paged_decode_attention_ref(q, PagedKV(k, v, tables, ctx), 0.125)
    kq, vq = quantize_ref(k, scales[2], qdtype), quantize_ref(v, scales[3], qdtype)
    approx = paged_decode_attention_ref(q, PagedKV(kq, vq, tables, ctx, scales=scales), 0.125)
    err = (approx - exact).abs().max() / exact.abs().max()
    assert err < (0.08 if qdtype != torch.int8 else 0.03), f"relative error {err:.3f}"
    assert torch.equal(dequantize_ref(kq, scales[0], torch.float32), kq.float() * k_scale[:, None])


@pytest.mark.parametrize("norm", [False, True])
def test_quantized_qkv_prepare_stores_like_reference(qdtype, device, norm):
    n, hq, hkv, d, bs = 6, 4, 2, 32, 4
    heads = HeadLayout(hq, hkv, d)
    qkv = torch.randn(n, heads.qkv_width, device=device) * 4
    positions = torch.arange(n, device=device)
    freqs = torch.outer(torch.arange(n).float(), torch.rand(d // 2))
    qk = QKNormRope(
        *(torch.randn(2, d, device=device) if norm else (None, None)),
        1e-6,
        torch.cat([freqs.cos(), freqs.sin()], -1).to(device),
    )
    slots = torch.randperm(4 * bs)[:n].to(device)
    slots[1::3] = -1
    scales = _scales(hkv, device)
    outs = []
    for fn in (qkv_prepare_triton, qkv_prepare_ref):
        kc = torch.zeros(4, bs, hkv, d, dtype=qdtype, device=device)
        kv = PagedKV(kc, torch.zeros_like(kc), slot_mapping=slots, scales=scales)
        outs.append((fn(qkv, positions, heads, qk, kv), kv.k_cache, kv.v_cache))
    (q_got, k_got, v_got), (q_want, k_want, v_want) = outs
    torch.testing.assert_close(q_got, q_want)
    assert torch.equal(v_got.view(torch.uint8), v_want.view(torch.uint8))  # v: no float math
    _assert_within_one_step(k_got, k_want)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_quantized_decode_qkv_matches_reference(qdtype, paged_kv, device, check, num_splits):
    lens, hq, hkv, d, bs = [3, 21, 40], 4, 2, 32, 8
    kq, vq, scales, tables = _quantized_kv(paged_kv, lens, bs, hkv, d, qdtype, device)
    heads = HeadLayout(hq, hkv, d)
    ctx = torch.tensor(lens, device=device)
    last = ctx - 1
    slots = tables.long().gather(1, (last // bs)[:, None])[:, 0] * bs + last % bs
    freqs = torch.outer(torch.arange(max(lens)).float(), torch.rand(d // 2) * 0.5)
    qk = QKNormRope(None, None, 1e-6, torch.cat([freqs.cos(), freqs.sin()], -1).to(device))
    qkv = torch.randn(len(lens), heads.qkv_width, device=device)
    outs = []
    calls = ((paged_decode_qkv_triton, dict(num_splits=num_splits)), (paged_decode_qkv_ref, {}))
    for fn, kw in calls:
        kv = PagedKV(kq.clone(), vq.clone(), tables, ctx.int(), slots, scales)
        outs.append((fn(qkv, last, heads, qk, kv, d**-0.5, **kw), kv.k_cache, kv.v_cache))
    (got, k_got, v_got), (want, k_want, v_want) = outs
    check(got, want)
    assert torch.equal(v_got.view(torch.uint8), v_want.view(torch.uint8))
    _assert_within_one_step(k_got, k_want)


@pytest.mark.gpu
@pytest.mark.parametrize("qdtype", QDTYPES, ids=["fp8", "int8"])
def test_quantized_kernels_at_real_sizes(qdtype, paged_kv, check):
    """Qwen3-8B-like heads (32 q, 8 kv, 128 wide), bf16 queries, 16-token blocks."""
    torch.manual_seed(0)
    lens = torch.randint(1, 8193, (32,)).tolist()
    kq, vq, scales, tables = _quantized_kv(paged_kv, lens, 16, 8, 128, qdtype, "cuda")
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    kv = PagedKV(kq, vq, tables, ctx, scales=scales)
    q = torch.randn(len(lens), 32, 128, dtype=torch.bfloat16, device="cuda")
    check(
        paged_decode_attention_triton(q, kv, 128**-0.5),
        paged_decode_attention_ref(q, kv, 128**-0.5),
    )
    q_lens = [min(n, 512) for n in lens]
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32).cuda()
    q = torch.randn(sum(q_lens), 32, 128, dtype=torch.bfloat16, device="cuda")
    args = (q, kv, cu, 128**-0.5)
    check(varlen_prefill_attention_triton(*args), varlen_prefill_attention_ref(*args))
    k = torch.randn(4099, 8, 128, dtype=torch.bfloat16, device="cuda")
    slots = torch.randperm(kq.shape[0] * 16, device="cuda")[:4099]
    caches = [kq.clone() for _ in range(4)]
    store_kvcache_triton(k, k, caches[0], caches[1], slots, scales)
    store_kvcache_ref(k, k, caches[2], caches[3], slots, scales)
    assert torch.equal(caches[0].view(torch.uint8), caches[2].view(torch.uint8))


# ------------------------------------------------------------ H2O: attention mass per slot


def _scores_like(k_cache):
    return torch.zeros(k_cache.shape[:2], device=k_cache.device)


@pytest.mark.parametrize("quantized", [False, True])
def test_decode_attention_mass_matches_reference(paged_kv, device, quantized):
    """The decode kernels add each key's probability (summed over heads) to its slot, as
    the reference does; every query's mass adds up to its head count, but a context of one
    token (CUDA-graph padding) adds none."""
    lens, hq, hkv, d = [1, 13, 37], 4, 2, 32
    if quantized:
        kq, vq, scales, tables = _quantized_kv(paged_kv, lens, 4, hkv, d, torch.int8, device)
    else:
        kq, vq, tables = paged_kv(lens, 4, hkv, d, torch.float32)
        scales = None
    ctx = torch.tensor(lens, dtype=torch.int32, device=device)
    q = torch.randn(len(lens), hq, d, device=device)
    got, want = _scores_like(kq), _scores_like(kq)
    paged_decode_attention_triton(q, PagedKV(kq, vq, tables, ctx, scales=scales, scores=got), 0.2)
    paged_decode_attention_ref(q, PagedKV(kq, vq, tables, ctx, scales=scales, scores=want), 0.2)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(want.sum(), torch.tensor(hq * 2.0))  # lens 13 and 37


def test_prefill_attention_mass_matches_reference(paged_kv, device):
    context_lens, q_lens = [5, 40, 17], [5, 20, 1]
    k, v, tables = paged_kv(context_lens, 8, 2, 32, torch.float32)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
    q = torch.randn(sum(q_lens), 4, 32, device=device)
    got, want = _scores_like(k), _scores_like(k)
    args = (cu.to(device), 32**-0.5)
    varlen_prefill_attention_triton(q, PagedKV(k, v, tables, lens, scores=got), *args)
    varlen_prefill_attention_ref(q, PagedKV(k, v, tables, lens, scores=want), *args)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(want.sum(), torch.tensor(4.0 * sum(q_lens)))


def test_decode_qkv_attention_mass_matches_reference(paged_kv, device):
    lens, hq, hkv, d, bs = [3, 21, 40], 4, 2, 32, 8
    k, v, tables = paged_kv(lens, bs, hkv, d, torch.float32)
    heads = HeadLayout(hq, hkv, d)
    ctx = torch.tensor(lens, device=device)
    last = ctx - 1
    slots = tables.long().gather(1, (last // bs)[:, None])[:, 0] * bs + last % bs
    qkv = torch.randn(len(lens), heads.qkv_width, device=device)
    got, want = _scores_like(k), _scores_like(k)
    for fn, scores in ((paged_decode_qkv_triton, got), (paged_decode_qkv_ref, want)):
        kv = PagedKV(k.clone(), v.clone(), tables, ctx.int(), slots, scores=scores)
        fn(qkv, last, heads, QKNormRope(), kv, d**-0.5)
    torch.testing.assert_close(got, want)
