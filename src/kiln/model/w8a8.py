"""W8A8 Linears: 8-bit weights (int8 or float8 e4m3) with one scale per output channel, and
8-bit activations quantized as they arrive, one scale per token (dynamic) or one static scale
for the whole tensor (as per-tensor FP8 checkpoints store it).

    y = (x_q @ W_q^T) * x_scale * w_scale^T + bias      x_q [M, K], W_q [N, K], scales [M|N, 1]

The reference runs anywhere: the activations quantized per row in torch
(kiln.kernels.quant_act), the matmul in float32, the scales applied after. The kernels (CUDA),
by the number of rows M (pick_backend):
- M <= FUSED_MAX_M (decode; none by default, see there), "fused": one Triton kernel
  (kiln.kernels.w8a8_mm's GEMV) quantizes x's rows as it loads them and multiplies on the CUDA
  cores; scales, bias and cast in its epilogue. One launch, and 256 programs at N = 4096,
  where torch._scaled_mm's rowwise kernel gives N = 4096 only 32 64x128 tiles on 132 SMs (and
  copies x_scale into a 256-row buffer first when M % 256), so it read the weight at a
  fraction of the bandwidth;
- else one Triton kernel quantizes the activations, then FP8 goes through torch._scaled_mm
  with rowwise scales and the bias in its epilogue ("scaled_mm", from SCALED_MM_MIN_M rows)
  or kiln's tensor-core GEMM ("triton", below), int8 through kiln's GEMM (INT8_GEMM
  "triton") or torch._int_mm and one Triton epilogue kernel ("int_mm"). torch._int_mm calls
  cuBLASLt with no heuristic query and no workspace (CUDABlas.cpp int8_gemm: algo nullptr,
  workspace 0), which keeps it off the Hopper kernels (pytorch/pytorch#187094 finds
  cutlass_80 ones on sm_103), and its int32 output took four more passes over [M, N] (float,
  * x_scale, * w_scale, to bf16) before this.
Nothing reads back to the host, so CUDA graphs capture them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kiln.kernels._triton import HAS_TRITON
from kiln.kernels.quant_act import (
    FP8,
    MIN_SCALE,
    qmax,
    quantize_rows_ref,
    quantize_rows_triton,
    to_8bit,
)
from kiln.kernels.w8a8_mm import scale_epilogue_triton, w8a8_gemv_triton, w8a8_mm_triton

QDTYPES = {"float": FP8, "int": torch.int8}  # compressed-tensors' `type` -> storage dtype

# Up to this many rows, one kernel quantizes x and multiplies (a GEMV). 0: never by default.
# Measured on an H100 (notes/BENCHMARKS.md, session 10) the GEMV lost to the two-launch path
# at M = 4 by 3-6x and at M = 1 on three of Llama-3-8B's four projections (their sum: fp8
# 122.2 vs 119.8 us, int8 119.2 vs 112.2); it stays as a forced path (bench_w8a8 --backends).
FUSED_MAX_M = 0
SCALED_MM_MIN_M = 128  # FP8 from this many rows: torch._scaled_mm; below, kiln's GEMM
# int8 past FUSED_MAX_M rows: kiln's GEMM ("triton") or torch._int_mm + epilogue ("int_mm").
INT8_GEMM = os.environ.get("KILN_W8A8_INT8", "triton")
BACKENDS = ("fused", "triton", "scaled_mm", "int_mm")


@dataclass
class W8A8Weight:
    """A W8A8 Linear's stored weight: weight [out, in] int8 / float8_e4m3fn, weight_scale
    [out, 1] float32 (one per output channel)."""

    weight: torch.Tensor
    weight_scale: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in]."""
        return self.weight.float() * self.weight_scale


def quantize_weight(w: torch.Tensor, dtype: torch.dtype) -> W8A8Weight:
    """Symmetric per-output-channel 8-bit quantization of w [out, in]: scale = absmax / qmax."""
    w = w.detach().float()
    scale = (w.abs().amax(1, keepdim=True) / qmax(dtype)).clamp(min=MIN_SCALE)
    return W8A8Weight(to_8bit(w, scale, dtype), scale)


def w8a8_mm_reference(
    xq: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, out_dtype
) -> torch.Tensor:
    """(xq [M, K] @ w [N, K]^T) * x_scale [M, 1] * w_scale^T [1, N] in float32 -> out_dtype."""
    return ((xq.float() @ w.float().t()) * x_scale * w_scale.t()).to(out_dtype)


def pick_backend(dtype: torch.dtype, m: int) -> str:
    """The kernels for M rows of a W8A8 Linear of 8-bit `dtype` (one of BACKENDS)."""
    if not HAS_TRITON:
        return "scaled_mm" if dtype == FP8 else "int_mm"
    if m <= FUSED_MAX_M:
        return "fused"
    if dtype == FP8:
        return "scaled_mm" if m >= SCALED_MM_MIN_M else "triton"
    return INT8_GEMM


def w8a8_mm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """w8a8_mm_reference (then + bias) on CUDA's 8-bit tensor cores: kiln's Triton GEMM
    ("triton"), torch._scaled_mm (FP8, "scaled_mm") or torch._int_mm (int8, "int_mm");
    None picks by dtype and M (pick_backend)."""
    if backend is None:
        backend = pick_backend(w.dtype, xq.shape[0])
    if backend == "fused":  # x is quantized already: kiln's GEMM
        backend = "triton"
    x_scale = x_scale.contiguous()  # a static scale comes expanded from quantize_rows_ref
    if backend == "triton":
        return w8a8_mm_triton(xq, x_scale, w, w_scale, out_dtype, bias)
    if backend == "scaled_mm":  # rowwise scaling wants float32 [M, 1] x [1, N] scales, bf16 out
        assert w.dtype == FP8, w.dtype
        fuse_bias = bias is not None and bias.dtype == torch.bfloat16
        y = torch._scaled_mm(
            xq,
            w.t(),
            scale_a=x_scale,
            scale_b=w_scale.t(),
            bias=bias if fuse_bias else None,
            out_dtype=torch.bfloat16,
        ).to(out_dtype)
        return y if bias is None or fuse_bias else y + bias
    assert backend == "int_mm" and w.dtype == torch.int8, (backend, w.dtype)
    m = xq.shape[0]
    if m <= 16:  # _int_mm wants more than 16 rows
        xq = F.pad(xq, (0, 0, 0, 17 - m))
    acc = torch._int_mm(xq, w.t())[:m]  # [M, N] int32; w.t(): column-major, cuBLASLt's "TN"
    if HAS_TRITON:
        return scale_epilogue_triton(acc, x_scale, w_scale, out_dtype, bias)
    y = (acc.float() * x_scale * w_scale.t()).to(out_dtype)
    return y if bias is None else y + bias


def w8a8_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """x [M, K] (float) quantized per row (or by input_scale []) and multiplied by the 8-bit
    w [N, K] on CUDA (+ bias), in x's dtype: "fused" in one Triton GEMV (up to
    kiln.kernels.w8a8_mm.GEMV_MAX_M rows), else the Triton quantization kernel and
    w8a8_mm's `backend`; None picks by dtype and M (pick_backend)."""
    x = x.contiguous()
    if backend is None:
        backend = pick_backend(w.dtype, x.shape[0])
    if backend == "fused":
        return w8a8_gemv_triton(x, w, w_scale, bias, input_scale)
    quantize = quantize_rows_triton if HAS_TRITON else quantize_rows_ref
    xq, x_scale = quantize(x, w.dtype, input_scale)
    return w8a8_mm(xq, x_scale, w, w_scale, x.dtype, bias, backend)


def kernel_fits(w: torch.Tensor) -> bool:
    """Whether the CUDA kernels take this weight's shape (K and N multiples of 16)."""
    n, k = w.shape
    return w.is_cuda and n % 16 == 0 and k % 16 == 0


class W8A8Linear(nn.Module):
    """A Linear with 8-bit weights [out, in] (per-channel weight_scale [out, 1] float32) and
    8-bit activations: per-token scales, or input_scale [] when the checkpoint fixed one.
    use_kernel False (or a shape the kernels refuse) runs the reference."""

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        input_scale: torch.Tensor | None = None,
    ):
        super().__init__()
        assert weight.dtype in (FP8, torch.int8), weight.dtype
        # Contiguous [out, in]: K-major, as the kernels read it (w.t() is then the column-major
        # operand cuBLASLt's 8-bit paths want, with no copy a call).
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.weight_scale = nn.Parameter(
            weight_scale.float().reshape(-1, 1).expand(weight.shape[0], 1).contiguous(),
            requires_grad=False,
        )
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.input_scale = None
        if input_scale is not None:
            self.input_scale = nn.Parameter(input_scale.float().reshape(()), requires_grad=False)
        self.use_kernel = True

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.use_kernel and kernel_fits(self.weight):
            y = w8a8_linear(x2, self.weight, self.weight_scale, self.bias, self.input_scale)
        else:
            xq, x_scale = quantize_rows_ref(x2, self.weight.dtype, self.input_scale)
            y = w8a8_mm_reference(xq, x_scale, self.weight, self.weight_scale, x.dtype)
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*lead, self.out_features)

    @classmethod
    def cat(cls, parts: list[W8A8Linear]) -> W8A8Linear:
        """One W8A8Linear computing the parts' outputs side by side (fused q/k/v, gate/up):
        weights and their per-channel scales stacked along the output; a static input scale
        becomes the largest of the parts' (the same input, so none of them clips)."""
        bias = None if parts[0].bias is None else torch.cat([p.bias for p in parts])
        statics = [p.input_scale for p in parts if p.input_scale is not None]
        assert len(statics) in (0, len(parts)), "mixed static and dynamic input scales"
        fused = cls(
            torch.cat([p.weight for p in parts]),
            torch.cat([p.weight_scale for p in parts]),
            bias,
            torch.stack(statics).max() if statics else None,
        )
        fused.use_kernel = parts[0].use_kernel
        return fused

    def extra_repr(self) -> str:
        act = "static" if self.input_scale is not None else "per-token"
        return f"{self.in_features}, {self.out_features}, {self.weight.dtype}, {act} activations"
