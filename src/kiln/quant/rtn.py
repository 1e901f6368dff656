"""Round-to-nearest weight quantization: per output channel (group_size -1) or per group of
input columns, symmetric or asymmetric. GPTQ reuses the grid (`grid`, `to_int`) column by column.
"""

from __future__ import annotations

import torch

from kiln.errors import InputError
from kiln.model.quantized import IntWeight

BITS = (4, 8)


def check_shape(name: str, in_features: int, out_features: int, bits: int, group_size: int):
    """InputError unless the bits, the group size and this Linear's widths fit the formats."""
    if bits not in BITS:
        raise InputError(f"--bits {bits} is not supported; choose 4 or 8", param="bits")
    if group_size != -1 and group_size <= 0:
        raise InputError(
            f"--group-size {group_size}: use a positive size or -1", param="group_size"
        )
    if group_size != -1 and in_features % group_size:
        raise InputError(
            f"{name}: in_features {in_features} is not divisible by --group-size {group_size}",
            param="group_size",
        )
    pack = 32 // bits
    if in_features % pack or out_features % pack:
        raise InputError(
            f"{name}: widths {in_features}x{out_features} do not pack {pack} to an int32",
            param="bits",
        )


def grid(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16-rounded) and integer zero [out] covering w [out, n] as AutoGPTQ does."""
    maxq = 2**bits - 1
    w = w.float()
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    span = xmax - xmin
    span = torch.where(span == 0, torch.ones_like(span), span)  # an all-zero row
    scale = (span / maxq).clamp(min=2**-14).half().float()  # no fp16 underflow to 0
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero.to(torch.int32)


def to_int(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers in [0, 2^bits) of w [out, n] on the grid scale/zero [out]."""
    q = torch.round(w.float() / scale[:, None]) + zero[:, None]
    return q.clamp(0, 2**bits - 1).to(torch.int32)


def quantize_rtn(w: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True):
    """Quantize a Linear weight w [out, in] to the nearest point of a per-group grid."""
    out_features, in_features = w.shape
    size = in_features if group_size == -1 else group_size
    q = torch.empty(out_features, in_features, dtype=torch.int32, device=w.device)
    scales, zeros = [], []
    for start in range(0, in_features, size):
        cols = w[:, start : start + size]
        scale, zero = grid(cols, bits, sym)
        q[:, start : start + size] = to_int(cols, scale, zero, bits)
        scales.append(scale)
        zeros.append(zero)
    g_idx = (torch.arange(in_features, device=w.device) // size).to(torch.int32)
    return IntWeight(
        q.t().contiguous(),
        torch.stack(scales).half(),
        torch.stack(zeros),
        g_idx,
        bits,
    )
