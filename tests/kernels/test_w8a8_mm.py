"""The Triton W8A8 kernels (kiln.kernels.w8a8_mm) against the float32 reference: int8 byte for
byte (the shapes keep the reference's float32 matmul exact), FP8 to float32 rounding; the
fused GEMV's quantization against the quantization kernel; the epilogue alone against torch's
four ops. Under the interpreter the tiles are 16 x 16 x 32, so these shapes cross every tile
edge."""

import pytest
import torch

from kiln.kernels.quant_act import FP8, quantize_rows_ref, quantize_rows_triton
from kiln.kernels.w8a8_mm import (
    GEMV_MAX_M,
    gemv_config,
    gemv_sweep_configs,
    pick_config,
    scale_epilogue_triton,
    smem_bytes,
    sweep_configs,
    w8a8_gemv_triton,
    w8a8_mm_triton,
)
from kiln.model.w8a8 import quantize_weight, w8a8_mm_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter casts float32 to bfloat16 by truncation (torch and CUDA round to nearest):
# float16 stands in for a 16-bit output on CPU.
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16


def gaussian(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def layer(dtype, n=40, k=100, bias_dtype=None, seed=0):
    w = quantize_weight(0.05 * gaussian(n, k, seed=seed), dtype)
    bias = None if bias_dtype is None else gaussian(n, seed=seed + 1).to(bias_dtype)
    return w.weight, w.weight_scale, bias


def reference(xq, xs, w, ws, out_dtype, bias):
    y = w8a8_mm_reference(xq, xs, w, ws, out_dtype)
    return y if bias is None else y + bias


@pytest.mark.parametrize("m", [1, 5, 37])
@pytest.mark.parametrize("out_dtype", [torch.float32, HALF])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_gemm_gives_the_reference_bytes(m, out_dtype, with_bias):
    w, ws, bias = layer(torch.int8, bias_dtype=out_dtype if with_bias else None)
    xq, xs = quantize_rows_ref(gaussian(m, 100, seed=3), torch.int8)
    out = w8a8_mm_triton(xq, xs, w, ws, out_dtype, bias)
    assert out.dtype == out_dtype and out.shape == (m, 40)
    assert torch.equal(out, reference(xq, xs, w, ws, out_dtype, bias))


@pytest.mark.parametrize("m", [1, 37])
def test_fp8_gemm_matches_the_reference(m):
    w, ws, bias = layer(FP8, bias_dtype=torch.float32)
    xq, xs = quantize_rows_ref(gaussian(m, 100, seed=3), FP8)
    out = w8a8_mm_triton(xq, xs, w, ws, torch.float32, bias)
    # e4m3 products are exact in float32; the sums differ in order (and on the tensor cores,
    # within a BLOCK_K chunk, in precision)
    expect = reference(xq, xs, w, ws, torch.float32, bias)
    torch.testing.assert_close(out, expect, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.int8, FP8])
@pytest.mark.parametrize("static", [None, 0.02])
@pytest.mark.parametrize("m", [1, 3, GEMV_MAX_M])
def test_fused_gemv_equals_quantizing_first(dtype, static, m):
    """The GEMV quantizing x itself gives quantize_rows_triton's bytes, hence the same y
    (int8: the same integers, so equal; FP8: float32 sums in another order)."""
    w, ws, bias = layer(dtype, bias_dtype=torch.float32)
    x = gaussian(m, 100, seed=4) * torch.logspace(-3, 2, m, device=DEVICE)[:, None]
    if m > 1:
        x[-1] = 0.0  # an all-zero row: MIN_SCALE, no NaN
    scale = None if static is None else torch.tensor(static, device=DEVICE)
    fused = w8a8_gemv_triton(x, w, ws, bias, scale)
    assert fused.shape == (m, 40) and fused.dtype == x.dtype
    xq, xs = quantize_rows_triton(x, dtype, scale)
    gemm = w8a8_mm_triton(xq, xs, w, ws, x.dtype, bias)
    if dtype == torch.int8:
        assert torch.equal(fused, gemm)
        xq, xs = quantize_rows_ref(x, dtype, scale)  # and the reference's, end to end
        assert torch.equal(fused, reference(xq, xs.contiguous(), w, ws, x.dtype, bias))
    else:  # float32 sums on the CUDA cores against the tensor cores'
        torch.testing.assert_close(fused, gemm, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("m", [1, 4])
def test_fused_gemv_at_other_launch_settings(m):
    w, ws, bias = layer(torch.int8, k=300, bias_dtype=torch.float32)
    x = gaussian(m, 300, seed=4)
    expect = w8a8_gemv_triton(x, w, ws, bias)
    for cfg in (dict(BLOCK_N=4, BLOCK_K=64, num_warps=2, num_stages=1),
                dict(BLOCK_N=64, BLOCK_K=512, num_warps=4, num_stages=2)):  # fmt: skip
        assert torch.equal(w8a8_gemv_triton(x, w, ws, bias, config=cfg), expect)


def test_fused_gemv_reads_rows_with_a_stride():
    w, ws, _ = layer(torch.int8)
    wide = gaussian(6, 160, seed=5)
    x = wide[:, 30:130]  # rows 160 apart
    assert torch.equal(w8a8_gemv_triton(x, w, ws), w8a8_gemv_triton(x.contiguous(), w, ws))


@pytest.mark.parametrize("acc_dtype", [torch.int32, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_scale_epilogue_is_the_four_torch_ops_in_one(acc_dtype, with_bias):
    g = torch.Generator().manual_seed(6)
    acc = torch.randint(-(2**20), 2**20, (21, 40), generator=g).to(acc_dtype).to(DEVICE)
    xs, ws = 1e-3 * gaussian(21, 1, seed=7).abs(), 1e-3 * gaussian(40, 1, seed=8).abs()
    bias = gaussian(40, seed=9).to(HALF) if with_bias else None
    out = scale_epilogue_triton(acc, xs, ws, HALF, bias)
    expect = (acc.float() * xs * ws.t()).to(HALF)
    assert torch.equal(out, expect if bias is None else expect + bias)


def test_empty_input():
    w, ws, _ = layer(torch.int8)
    assert w8a8_gemv_triton(gaussian(0, 100), w, ws).shape == (0, 40)
    xq, xs = quantize_rows_ref(gaussian(0, 100), torch.int8)
    assert w8a8_mm_triton(xq, xs, w, ws, torch.float32).shape == (0, 40)


def test_configs_tile_the_shapes():
    for m in (1, 16, 17, 64, 256, 4096):
        for cfg in [pick_config(m, 4096)] + sweep_configs(m):
            assert cfg["BLOCK_M"] >= 16 and cfg["BLOCK_N"] >= 16 and cfg["BLOCK_K"] >= 32
            assert smem_bytes(cfg) <= 200 * 1024, cfg  # H100: 227 KiB a block
    for m in range(1, GEMV_MAX_M + 1):
        block_m = 1 << (m - 1).bit_length()
        for cfg in [gemv_config(m, 4096)] + gemv_sweep_configs(m):
            assert block_m * cfg["BLOCK_N"] * cfg["BLOCK_K"] <= 32768, (m, cfg)
    assert 4096 // gemv_config(1, 4096)["BLOCK_N"] >= 128  # decode: >= 128 programs


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.int8, FP8])
@pytest.mark.parametrize("m", [1, 16, 17, 64, 300])
def test_cuda_gemm_matches_the_reference_at_every_config(dtype, m):
    w, ws, bias = layer(dtype, n=512, k=1024, bias_dtype=torch.bfloat16)
    xq, xs = quantize_rows_ref(gaussian(m, 1024, seed=3).bfloat16(), dtype)
    ref = reference(xq, xs, w, ws, torch.bfloat16, bias).float()
    for cfg in [pick_config(m, 512)] + sweep_configs(m)[::5]:
        out = w8a8_mm_triton(xq, xs, w, ws, torch.bfloat16, bias, config=cfg).float()
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2, msg=str(cfg))
