"""The per-row 8-bit activation quantizer: the Triton kernel gives the torch reference's bytes
and scales (int8 under the interpreter; FP8 on CUDA, as the interpreter's e4m3 cast does not
carry a round-up into the next exponent)."""

import pytest
import torch

from kiln.kernels.quant_act import FP8, quantize_rows_ref, quantize_rows_triton


def rows(k: int, device="cpu") -> torch.Tensor:
    x = torch.randn(6, k, generator=torch.Generator().manual_seed(0))
    x = x * torch.tensor([1e-3, 1.0, 10.0, 0.0, 300.0, 1.0])[:, None]
    x[5, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5])  # exact halves: ties round to even
    return x.to(device)


def check(x, dtype, static):
    a, sa = quantize_rows_ref(x, dtype, static)
    b, sb = quantize_rows_triton(x, dtype, static)
    assert b.dtype == dtype and sb.shape == (x.shape[0], 1)
    assert torch.equal(sa, sb)
    assert torch.equal(a.view(torch.int8), b.view(torch.int8))


@pytest.mark.parametrize("k", [64, 300, 5000])  # 5000: the kernel loops over K in blocks
@pytest.mark.parametrize("static", [None, 0.05])
def test_int8_kernel_matches_reference(k, static):
    check(rows(k), torch.int8, None if static is None else torch.tensor(static))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [FP8, torch.int8])
@pytest.mark.parametrize("static", [None, 0.05])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_cuda_kernel_matches_reference(dtype, static, x_dtype):
    scale = None if static is None else torch.tensor(static, device="cuda")
    check(rows(4096, "cuda").to(x_dtype), dtype, scale)
