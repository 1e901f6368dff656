"""The fused qkv kernel (split, per-head RMSNorm, RoPE, KV store) against the unfused ops."""

import pytest
import torch
import triton
import triton.language as tl

from kiln.kernels.common import HeadLayout, PagedKV, QKNormRope, sum_squares, torch_sum_plan
from kiln.kernels.qkv_prepare import qkv_prepare, qkv_prepare_ref, qkv_prepare_triton
from kiln.kernels.rmsnorm import rmsnorm_ref
from kiln.kernels.rope import rope_ref
from kiln.kernels.store_kvcache import store_kvcache_ref

EPS = 1e-6


def _make_inputs(
    n, num_heads, num_kv_heads, head_dim, block_size, dtype, device, *,
    norm=True, rope=True, index_dtype=torch.int64, pad_cols=0, num_blocks=None, max_pos=64,
):  # fmt: skip
    """qkv (a column slice of a wider tensor when pad_cols > 0), positions, cos_sin, weights,
    cache shape, and scattered slots of which every third is -1."""
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(n, width + pad_cols, dtype=dtype, device=device)[:, :width]
    positions = torch.randint(0, max_pos, (n,)).to(index_dtype).to(device)
    cos_sin = None
    if rope:
        freqs = torch.outer(torch.arange(max_pos).float(), torch.rand(head_dim // 2))
        cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)
    q_w = k_w = None
    if norm:
        q_w = torch.randn(head_dim, dtype=dtype, device=device)
        k_w = torch.randn(head_dim, dtype=dtype, device=device)
    num_blocks = num_blocks or -(-n // block_size) + 2
    slots = torch.randperm(num_blocks * block_size)[:n]
    slots[1::3] = -1  # padding tokens: q is still computed, nothing is stored
    slots = slots.to(index_dtype).to(device)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return qkv, positions, cos_sin, q_w, k_w, shape, slots


def _run(fn, qkv, positions, cos_sin, q_w, k_w, shape, slots, num_heads, num_kv_heads):
    # NaN everywhere first: a slot written by one and not the other shows up
    k_cache = torch.full(shape, float("nan"), dtype=qkv.dtype, device=qkv.device)
    v_cache = torch.full_like(k_cache, float("nan"))
    heads = HeadLayout(num_heads, num_kv_heads, shape[-1])
    kv = PagedKV(k_cache, v_cache, slot_mapping=slots)
    q = fn(qkv, positions, heads, QKNormRope(q_w, k_w, EPS, cos_sin), kv)
    return q, k_cache, v_cache


def _assert_like_reference(check, inputs, num_heads, num_kv_heads, fn=qkv_prepare_triton):
    got = _run(fn, *inputs, num_heads, num_kv_heads)
    want = _run(qkv_prepare_ref, *inputs, num_heads, num_kv_heads)
    assert got[0].shape == want[0].shape and got[0].is_contiguous()
    check(got[0], want[0])
    for g, w in zip(got[1:], want[1:]):
        assert torch.equal(g.isnan(), w.isnan()), "stored slots differ"
        check(g.nan_to_num(), w.nan_to_num())


@pytest.mark.parametrize("head_dim,block_size", [(32, 4), (64, 16)])
@pytest.mark.parametrize("norm,rope", [(True, True), (False, True), (False, False)])
def test_qkv_prepare_matches_reference(dtype, device, check, head_dim, block_size, norm, rope):
    inputs = _make_inputs(5, 4, 2, head_dim, block_size, dtype, device, norm=norm, rope=rope)
    _assert_like_reference(check, inputs, 4, 2)


def test_qkv_prepare_norm_without_rope(dtype, device, check):
    inputs = _make_inputs(5, 4, 2, 32, 8, dtype, device, norm=True, rope=False)
    _assert_like_reference(check, inputs, 4, 2)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_qkv_prepare_strided_qkv_and_index_dtypes(dtype, device, check, index_dtype):
    inputs = _make_inputs(6, 4, 2, 32, 4, dtype, device, index_dtype=index_dtype, pad_cols=40)
    assert inputs[0].stride(0) > inputs[0].shape[1]
    _assert_like_reference(check, inputs, 4, 2)


def test_qkv_prepare_head_dim_128_and_odd_head_counts(device, check):
    # head_dim 128 takes the vectorized summation order, 3 and 1 heads leave padded rows
    inputs = _make_inputs(3, 3, 1, 128, 4, torch.bfloat16, device)
    _assert_like_reference(check, inputs, 3, 1)


def test_qkv_prepare_dispatches(device, check):
    inputs = _make_inputs(4, 4, 2, 32, 4, torch.float32, device)
    _assert_like_reference(check, inputs, 4, 2, fn=qkv_prepare)


def test_qkv_prepare_reference_is_the_unfused_sequence():
    n, hq, hkv, d = 5, 4, 2, 32
    qkv, positions, cos_sin, q_w, k_w, shape, slots = _make_inputs(
        n, hq, hkv, d, 4, torch.bfloat16, "cpu"
    )
    got = _run(qkv_prepare_ref, qkv, positions, cos_sin, q_w, k_w, shape, slots, hq, hkv)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.reshape(n, hq, d), k.reshape(n, hkv, d), v.reshape(n, hkv, d)
    q, k = rmsnorm_ref(q, q_w, EPS), rmsnorm_ref(k, k_w, EPS)
    q, k = rope_ref(q, k, positions, cos_sin)
    k_cache = torch.full(shape, float("nan"), dtype=torch.bfloat16)
    v_cache = torch.full_like(k_cache, float("nan"))
    store_kvcache_ref(k, v, k_cache, v_cache, slots)
    assert torch.equal(got[0], q)
    assert torch.equal(got[1].isnan(), k_cache.isnan()) and (got[1].isnan().any())
    assert torch.equal(got[1].nan_to_num(), k_cache.nan_to_num())
    assert torch.equal(got[2].nan_to_num(), v_cache.nan_to_num())


def _sum_in_plan_order(s: torch.Tensor, vec: int, width: int) -> torch.Tensor:
    """Row sums of s [R, D] float32 in the order torch_sum_plan describes, op by op."""
    rows, head_dim = s.shape
    if vec == 4:  # element 4 * (x + width * j) + i goes to lane x's i-th running sum
        parts = s.reshape(rows, head_dim // (4 * width), width, 4)
        acc = parts[:, 0]
        for j in range(1, parts.shape[1]):
            acc = acc + parts[:, j]
        t = ((acc[..., 0] + acc[..., 1]) + acc[..., 2]) + acc[..., 3]
    else:
        t = s
    while t.shape[1] > 1:
        half = t.shape[1] // 2
        t = t[:, :half] + t[:, half:]
    return t[:, 0]


@triton.jit
def _sum_squares_kernel(
    x_ptr, out_ptr, num_heads, D: tl.constexpr, VEC: tl.constexpr, LOG_BW: tl.constexpr,
    BLOCK_H: tl.constexpr,
):  # fmt: skip
    heads = tl.arange(0, BLOCK_H)[:, None]
    sums = sum_squares(x_ptr, num_heads, D, VEC, LOG_BW, BLOCK_H)
    tl.store(out_ptr + heads, sums, mask=heads < num_heads)


@pytest.mark.parametrize(
    "head_dim,rows",
    [(16, 5), (32, 5), (64, 5), (64, 16), (128, 5), (256, 8), (256, 16), (512, 2), (512, 8)],
)
def test_kernel_sums_in_plan_order(device, head_dim, rows):
    """Float32 sums of squares, bit for bit in torch_sum_plan's order (BW 32, 64, 128)."""
    num_heads = 3
    scale = torch.rand(num_heads, head_dim).pow(8)  # varied magnitudes: the order shows
    x = (torch.randn(num_heads, head_dim) * scale).to(device)
    vec, width = torch_sum_plan(rows, head_dim)
    got = torch.empty(num_heads, device=device)
    _sum_squares_kernel[(1,)](
        x,
        got,
        num_heads,
        D=head_dim,
        VEC=vec,
        LOG_BW=width.bit_length() - 1,
        BLOCK_H=4,
        enable_fp_fusion=False,
    )
    assert torch.equal(got, _sum_in_plan_order(x * x, vec, width))


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("rows", [1, 2, 8, 16, 98384])
def test_torch_sums_rows_in_plan_order(head_dim, rows):
    """Pins the assumption the kernel's bit-exactness rests on: torch's CUDA mean over the
    last dim adds up in torch_sum_plan's order (if this fails, torch changed its kernel)."""
    x = torch.randn(rows, head_dim, dtype=torch.bfloat16, device="cuda")
    x = x * torch.rand(rows, 1, device="cuda").pow(8).to(torch.bfloat16)  # varied magnitudes
    s = x.float().pow(2)
    want = s.mean(-1)
    got = _sum_in_plan_order(s, *torch_sum_plan(rows, head_dim)) * (1.0 / head_dim)
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [4099, 1])
@pytest.mark.parametrize("norm", [True, False])
def test_qkv_prepare_bit_exact_at_qwen3_sizes(n, norm):
    inputs = _make_inputs(
        n, 16, 8, 128, 16, torch.bfloat16, "cuda",
        norm=norm, index_dtype=torch.int32, num_blocks=n // 16 + 300, max_pos=40960,
    )  # fmt: skip
    got = _run(qkv_prepare_triton, *inputs, 16, 8)
    want = _run(qkv_prepare_ref, *inputs, 16, 8)
    assert torch.equal(got[0], want[0])
    for g, w in zip(got[1:], want[1:]):
        assert torch.equal(g.isnan(), w.isnan())
        assert torch.equal(g.nan_to_num(), w.nan_to_num())
