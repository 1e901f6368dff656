"""W8A8 Linears: 8-bit weights (int8 or float8 e4m3) with one scale per output channel, and
8-bit activations quantized as they arrive, one scale per token (dynamic) or one static scale
for the whole tensor (as per-tensor FP8 checkpoints store it).

    y = (x_q @ W_q^T) * x_scale * w_scale^T + bias      x_q [M, K], W_q [N, K], scales [M|N, 1]

The reference runs anywhere: the activations quantized per row in torch
(kiln.kernels.quant_act), the matmul in float32, the scales applied after. The kernels (CUDA):
the activations quantized by one Triton kernel, then FP8 through torch._scaled_mm with rowwise
scales (bf16 out), int8 through torch._int_mm (int32 accumulators). Nothing reads back to the
host, so CUDA graphs capture them.
"""

from __future__ import annotations

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

QDTYPES = {"float": FP8, "int": torch.int8}  # compressed-tensors' `type` -> storage dtype


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


def w8a8_mm(
    xq: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, out_dtype
) -> torch.Tensor:
    """w8a8_mm_reference on CUDA's 8-bit tensor cores."""
    if w.dtype == FP8:  # rowwise scaling wants float32 [M, 1] x [1, N] scales and bf16 out
        y = torch._scaled_mm(
            xq,
            w.t(),
            scale_a=x_scale.contiguous(),
            scale_b=w_scale.t(),
            out_dtype=torch.bfloat16,
        )
        return y.to(out_dtype)
    m = xq.shape[0]
    if m <= 16:  # _int_mm wants more than 16 rows
        xq = F.pad(xq, (0, 0, 0, 17 - m))
    acc = torch._int_mm(xq, w.t())[:m]  # [M, N] int32
    return (acc.float() * x_scale * w_scale.t()).to(out_dtype)


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
        self.weight = nn.Parameter(weight, requires_grad=False)
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
            quantize = quantize_rows_triton if HAS_TRITON else quantize_rows_ref
            xq, x_scale = quantize(x2.contiguous(), self.weight.dtype, self.input_scale)
            y = w8a8_mm(xq, x_scale, self.weight, self.weight_scale, x.dtype)
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
