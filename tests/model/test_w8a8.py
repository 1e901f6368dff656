"""W8A8Linear: per-token activation quantization, the float32 reference against plain math, the
fused (concatenated) layer against its parts, and on CUDA the kernels against the reference."""

import pytest
import torch

from kiln.kernels.quant_act import quantize_rows_ref as quantize_rows
from kiln.model import w8a8
from kiln.model.w8a8 import (
    FP8,
    FUSED_MAX_M,
    SCALED_MM_MIN_M,
    W8A8Linear,
    pick_backend,
    quantize_weight,
    w8a8_linear,
    w8a8_mm,
    w8a8_mm_reference,
)

DTYPES = [FP8, torch.int8]


def gaussian(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_token_gets_its_own_scale(dtype):
    x = gaussian(6, 32) * torch.tensor([1e-3, 0.1, 1.0, 10.0, 100.0, 0.0])[:, None]
    q, scale = quantize_rows(x, dtype)
    assert q.dtype == dtype and scale.shape == (6, 1) and scale.dtype == torch.float32
    top = 448.0 if dtype == FP8 else 127.0
    assert torch.allclose(q[:5].float().abs().amax(1), torch.full((5,), top))
    assert torch.equal(q[5].float(), torch.zeros(32))  # an all-zero row stays zero, no NaN
    err = (q.float() * scale - x).abs() / x.abs().amax(1, keepdim=True).clamp(min=1e-30)
    assert err.max() <= (2**-4 if dtype == FP8 else 0.5 / 127 + 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_quantization_round_trips(dtype):
    w = 0.05 * gaussian(48, 64)
    q = quantize_weight(w, dtype)
    assert q.weight.dtype == dtype and q.weight_scale.shape == (48, 1)
    rel = (q.dequantize() - w).norm() / w.norm()
    assert rel < (0.04 if dtype == FP8 else 0.01)
    again = quantize_weight(q.dequantize(), dtype)  # the grid's points are fixed points
    assert torch.equal(again.weight.float(), q.weight.float())
    torch.testing.assert_close(again.weight_scale, q.weight_scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("static", [False, True])
def test_reference_is_the_matmul_of_the_dequantized_operands(dtype, static):
    w = quantize_weight(0.05 * gaussian(40, 64), dtype)
    bias = gaussian(40, seed=2)
    input_scale = torch.tensor(0.05) if static else None
    lin = W8A8Linear(w.weight, w.weight_scale, bias, input_scale)
    x = gaussian(3, 5, 64, seed=1)
    xq, xs = quantize_rows(x.reshape(-1, 64), dtype, input_scale)
    expect = (xq.float() * xs) @ w.dequantize().t() + bias
    out = lin(x)
    assert out.shape == (3, 5, 40)
    torch.testing.assert_close(out.reshape(-1, 40), expect, rtol=1e-5, atol=1e-5)
    plain = x @ (0.05 * gaussian(40, 64)).t() + bias
    assert (out - plain).norm() < 0.05 * plain.norm()


@pytest.mark.parametrize("static", [False, True])
def test_concatenated_layer_equals_its_parts(static):
    parts = []
    for i, n in enumerate([32, 16, 16]):
        w = quantize_weight(gaussian(n, 64, seed=i), FP8)
        s = torch.tensor(0.01 * (i + 1)) if static else None
        parts.append(W8A8Linear(w.weight, w.weight_scale, gaussian(n, seed=9 + i), s))
    fused = W8A8Linear.cat(parts)
    x = gaussian(7, 64, seed=5)
    if static:  # one shared input scale, the largest: the parts with it give the fused output
        for p in parts:
            p.input_scale = fused.input_scale
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], -1))


def test_backend_follows_the_row_count(monkeypatch):
    assert pick_backend(FP8, FUSED_MAX_M + 1) == pick_backend(FP8, 1) == "triton"
    monkeypatch.setattr(w8a8, "FUSED_MAX_M", 4)  # the GEMV, where a deployment turns it on
    assert pick_backend(FP8, 1) == pick_backend(torch.int8, 4) == "fused"
    assert pick_backend(FP8, 5) == "triton"
    monkeypatch.undo()
    assert pick_backend(FP8, SCALED_MM_MIN_M) == "scaled_mm"
    assert pick_backend(torch.int8, 4096) in ("triton", "int_mm")


INT8_BACKENDS = ["fused", "triton", "int_mm"]


@pytest.mark.parametrize("backend", INT8_BACKENDS)
@pytest.mark.parametrize("m", [1, 4, 20])
@pytest.mark.parametrize("static", [False, True])
def test_int8_kernel_paths_give_the_reference_bytes(backend, m, static):
    """On CPU (Triton's interpreter; torch._int_mm runs there too): every int8 path, the
    layer's reference included, gives the same bytes (the float32 matmul is exact here)."""
    w = quantize_weight(0.05 * gaussian(48, 64), torch.int8)
    bias = gaussian(48, seed=2)
    input_scale = torch.tensor(0.02) if static else None
    lin = W8A8Linear(w.weight, w.weight_scale, bias, input_scale)
    x = gaussian(m, 64, seed=1)
    if backend == "fused" and m > 4:
        return  # the GEMV's rows are few
    out = w8a8_linear(x, lin.weight, lin.weight_scale, lin.bias, lin.input_scale, backend)
    assert torch.equal(out, lin(x))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 16, 17, 256])
@pytest.mark.parametrize("with_bias", [False, True])
def test_cuda_kernel_matches_reference(dtype, m, with_bias):
    w = quantize_weight(0.05 * gaussian(512, 256), dtype)
    w_cuda, s_cuda = w.weight.cuda(), w.weight_scale.cuda()
    bias = gaussian(512, seed=2).cuda().bfloat16() if with_bias else None
    x = gaussian(m, 256, seed=1).cuda().bfloat16()
    xq, xs = quantize_rows(x, dtype)
    ref = w8a8_mm_reference(xq, xs, w_cuda, s_cuda, torch.bfloat16)
    ref = (ref if bias is None else ref + bias).float()
    for backend in ["triton", "scaled_mm" if dtype == FP8 else "int_mm", None]:
        out = w8a8_mm(xq, xs, w_cuda, s_cuda, torch.bfloat16, bias, backend)
        assert out.dtype == torch.bfloat16 and out.shape == (m, 512)
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2, msg=str(backend))
    for backend in ["fused", None] if m <= 16 else [None]:  # x quantized in the kernels
        out = w8a8_linear(x, w_cuda, s_cuda, bias, None, backend)
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2, msg=str(backend))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [8, 64, 256])
def test_cuda_graph_captures_the_kernel(dtype, m):
    w = quantize_weight(0.05 * gaussian(256, 128), dtype)
    bias = gaussian(256, seed=2).cuda().bfloat16()
    lin = W8A8Linear(w.weight.cuda(), w.weight_scale.cuda(), bias)
    x = gaussian(m, 128, seed=1).cuda().bfloat16()
    eager = lin(x)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        lin(x)  # warm up off the default stream, as capture wants
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        out = lin(x)
    x.copy_(2 * x)
    graph.replay()
    torch.testing.assert_close(out, lin(x))
    assert not torch.equal(out, eager)
