"""Decode GEMVs (plain, RMSNorm-fused, SiLU-and-mul-fused) against their torch references."""

import pytest
import torch
import torch.nn.functional as F

from kiln.kernels.gemv import (
    RESIDENT_MAX_M,
    default_config,
    gemv,
    gemv_ref,
    gemv_triton,
    resident_config,
    rmsnorm_gemv,
    rmsnorm_gemv_ref,
    rmsnorm_gemv_triton,
    silu_mul_gemv,
    silu_mul_gemv_ref,
    silu_mul_gemv_triton,
    sweep_configs,
)
from kiln.kernels.rmsnorm import rmsnorm_ref
from kiln.kernels.silu_and_mul import silu_and_mul_ref

# (M, K, N): the interpreter's 16 x 64 tiles leave ragged tails in N and K, except the last.
SHAPES = [(1, 96, 136), (3, 160, 40), (16, 160, 136), (16, 64, 64)]
EPS = 1e-6
# Qwen3-0.6B decode projections (K, N): qkv, o, gate_up, down.
QWEN3_SHAPES = {
    "qkv": (1024, 4096),
    "o": (2048, 1024),
    "gate_up": (1024, 6144),
    "down": (3072, 1024),
}


def _weights(n, k, dtype, device, bias):
    w = torch.randn(n, k, dtype=dtype, device=device) / k**0.5
    b = torch.randn(n, dtype=dtype, device=device) if bias else None
    return w, b


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_gemv_matches_reference(dtype, device, check, poisoned, m, k, n, bias):
    x = torch.randn(m, k, dtype=dtype, device=device)
    w, b = _weights(n, k, dtype, device, bias)
    check(poisoned(gemv_triton, x, w, b), gemv_ref(x, w, b))


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_rmsnorm_gemv_matches_reference(dtype, device, check, poisoned, m, k, n, bias, residual):
    x = torch.randn(m, k, dtype=dtype, device=device)
    r = torch.randn(m, k, dtype=dtype, device=device) if residual else None
    norm_w = torch.randn(k, dtype=dtype, device=device)
    w, b = _weights(n, k, dtype, device, bias)
    out, h = poisoned(rmsnorm_gemv_triton, x, r, norm_w, EPS, w, b)
    ref_out, ref_h = rmsnorm_gemv_ref(x, r, norm_w, EPS, w, b)
    check(out, ref_out)
    if residual:
        check(h, ref_h)  # the interpreter rounds to bfloat16 differently
    else:
        assert h is x and ref_h is x


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_silu_mul_gemv_matches_reference(dtype, device, check, poisoned, m, k, n, bias):
    gate_up = torch.randn(m, 2 * k, dtype=dtype, device=device)
    w, b = _weights(n, k, dtype, device, bias)
    check(poisoned(silu_mul_gemv_triton, gate_up, w, b), silu_mul_gemv_ref(gate_up, w, b))


@pytest.mark.parametrize("product", [0, 1, 2], ids=["broadcast", "dot", "dot_t"])
@pytest.mark.parametrize("m", [2, 9])
def test_every_product_path(device, check, poisoned, m, product):
    """Either way of multiplying (broadcast-and-sum, tl.dot), forced at any row count."""
    dtype = torch.float16
    x, residual = torch.randn(2, m, 160, dtype=dtype, device=device).unbind(0)
    norm_w = torch.randn(160, dtype=dtype, device=device)
    w, b = _weights(40, 160, dtype, device, bias=True)
    config = dict(BLOCK_N=8, BLOCK_K=32, num_warps=4, num_stages=1, PRODUCT=product)
    check(poisoned(gemv_triton, x, w, b, config=config), gemv_ref(x, w, b))
    got = poisoned(rmsnorm_gemv_triton, x, residual, norm_w, EPS, w, b, config=config)
    for a, e in zip(got, rmsnorm_gemv_ref(x, residual, norm_w, EPS, w, b)):
        check(a, e)
    gate_up = torch.cat([x, residual], dim=-1)
    check(
        poisoned(silu_mul_gemv_triton, gate_up, w, b, config=config),
        silu_mul_gemv_ref(gate_up, w, b),
    )


@pytest.mark.parametrize("elements", [64, 4096], ids=["narrow", "wide"])
@pytest.mark.parametrize("m,k,n", [(1, 96, 136), (3, 160, 40), (4, 64, 64), (2, 200, 7)])
def test_resident_kernel(dtype, device, check, poisoned, m, k, n, elements):
    """The whole-slice kernel (small M): every prologue, ragged N and padded K."""
    config = resident_config(m, n, k, elements)
    assert config["RESIDENT"] and config["BLOCK_K"] >= k
    x, residual = torch.randn(2, m, k, dtype=dtype, device=device).unbind(0)
    norm_w = torch.randn(k, dtype=dtype, device=device)
    w, b = _weights(n, k, dtype, device, bias=True)
    check(poisoned(gemv_triton, x, w, b, config=config), gemv_ref(x, w, b))
    check(poisoned(gemv_triton, x, w, config=config), gemv_ref(x, w))
    for r in (residual, None):
        out, h = poisoned(rmsnorm_gemv_triton, x, r, norm_w, EPS, w, b, config=config)
        ref_out, ref_h = rmsnorm_gemv_ref(x, r, norm_w, EPS, w, b)
        check(out, ref_out)
        check(h, ref_h)
    gate_up = torch.cat([x, residual], dim=-1)
    check(
        poisoned(silu_mul_gemv_triton, gate_up, w, b, config=config),
        silu_mul_gemv_ref(gate_up, w, b),
    )


def test_leading_dims_and_strided_rows(device, check):
    """x [..., K] keeps its leading dims; rows may be strided (a view of a wider tensor)."""
    wide = torch.randn(2, 3, 200, device=device)
    x = wide[..., :96]
    w, b = _weights(40, 96, torch.float32, device, bias=True)
    check(gemv_triton(x, w, b), gemv_ref(x, w, b))
    norm_w = torch.randn(96, device=device)
    residual = torch.randn(2, 3, 96, device=device)
    got = rmsnorm_gemv_triton(x, residual, norm_w, EPS, w, b)
    for a, e in zip(got, rmsnorm_gemv_ref(x, residual, norm_w, EPS, w, b)):
        check(a, e)


def test_references_are_the_unfused_ops():
    x, residual = torch.randn(2, 3, 48, dtype=torch.bfloat16).unbind(0)
    norm_w = torch.randn(48, dtype=torch.bfloat16)
    w = torch.randn(24, 48, dtype=torch.bfloat16)
    normed, h = rmsnorm_ref(x, norm_w, EPS, residual)
    out, ref_h = rmsnorm_gemv_ref(x, residual, norm_w, EPS, w)
    assert torch.equal(out, F.linear(normed, w)) and torch.equal(ref_h, h)
    gate_up = torch.randn(3, 96, dtype=torch.bfloat16)
    assert torch.equal(silu_mul_gemv_ref(gate_up, w), F.linear(silu_and_mul_ref(gate_up), w))


def test_dispatchers_match_references(device, check):
    """On CPU the dispatchers are the references; on CUDA, kernel or unfused kernels."""
    for m in (1, 5):
        x, residual = torch.randn(2, m, 64, device=device).unbind(0)
        norm_w = torch.randn(64, device=device)
        w, b = _weights(40, 64, torch.float32, device, bias=True)
        check(gemv(x, w, b), gemv_ref(x, w, b))
        for r in (None, residual):
            for a, e in zip(
                rmsnorm_gemv(x, r, norm_w, EPS, w, b), rmsnorm_gemv_ref(x, r, norm_w, EPS, w, b)
            ):
                check(a, e)
        gate_up = torch.cat([x, residual], dim=-1)
        check(silu_mul_gemv(gate_up, w, b), silu_mul_gemv_ref(gate_up, w, b))


def test_more_than_16_rows_is_refused(device):
    x = torch.randn(17, 64, device=device)
    w = torch.randn(16, 64, device=device)
    with pytest.raises(AssertionError, match="rows"):
        gemv_triton(x, w)


def test_configs():
    for m in (1, 3, 8, 16):  # Qwen3-0.6B's projections: each at least ~one program per SM
        for k, n in QWEN3_SHAPES.values():
            for silu_mul in (False, True):
                c = default_config(m, n, k, silu_mul=silu_mul)
                assert -(-n // c["BLOCK_N"]) >= 128
                if m <= RESIDENT_MAX_M:  # whole rows, ~16K weights a program
                    assert c["RESIDENT"] and c["BLOCK_K"] >= k
                    assert c["BLOCK_N"] * c["BLOCK_K"] == 16384
                else:
                    assert c["BLOCK_K"] <= k
    configs = sweep_configs()
    assert 8 <= len(configs) <= 12
    for c in configs:
        assert set(c) == {"BLOCK_N", "BLOCK_K", "num_warps", "num_stages"}
        assert c["num_warps"] in (2, 4, 8) and c["num_stages"] in (2, 3, 4)
        assert c["BLOCK_N"] in (4, 8, 16, 32, 64) and c["BLOCK_K"] in (256, 512, 1024, 2048)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 4, 8])
def test_gemvs_at_qwen3_sizes(check, poisoned, m):
    dtype, dev = torch.bfloat16, "cuda"
    w = {name: _weights(n, k, dtype, dev, bias=False)[0] for name, (k, n) in QWEN3_SHAPES.items()}
    x, residual = torch.randn(2, m, 1024, dtype=dtype, device=dev).unbind(0)
    norm_w = torch.randn(1024, dtype=dtype, device=dev)
    for name in ("qkv", "gate_up"):  # RMSNorm (+ residual) -> Linear
        for r in (residual, None):
            out, h = poisoned(rmsnorm_gemv_triton, x, r, norm_w, EPS, w[name])
            ref_out, ref_h = rmsnorm_gemv_ref(x, r, norm_w, EPS, w[name])
            check(out, ref_out)
            assert torch.equal(h, ref_h)
    attn = torch.randn(m, 2048, dtype=dtype, device=dev)
    check(poisoned(gemv_triton, attn, w["o"]), gemv_ref(attn, w["o"]))
    gate_up = torch.randn(m, 6144, dtype=dtype, device=dev)
    check(poisoned(silu_mul_gemv_triton, gate_up, w["down"]), silu_mul_gemv_ref(gate_up, w["down"]))
    for name, (k, _) in QWEN3_SHAPES.items():  # every sweep config compiles and is right
        a = torch.randn(m, k, dtype=dtype, device=dev)
        for config in sweep_configs():
            check(poisoned(gemv_triton, a, w[name], config=config), gemv_ref(a, w[name]))
