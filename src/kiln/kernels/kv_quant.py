"""The quantized KV cache's number formats: fp8 (e4m3) or int8 values with one float32 scale
per (layer, kv head), value = stored * scale.

A layer's scales travel to the kernels as one float32 tensor [4, Hkv]: k_scale, v_scale and
their reciprocals (the stores multiply by the reciprocal, so that the kernels and the torch
references round the same float32 product). The kernels read stored values back exactly
(fp8 and int8 values are exact in bfloat16, float16 and float32) and fold the scales into the
scores (k) and the output (v); the references dequantize before attending.

Rounding is torch's: round to nearest, ties to even, saturating at the format's largest value
(448 for e4m3, 127 for int8). The Triton side rounds to the fp8 grid in float32 arithmetic
before the cast (so the cast itself is exact), because Triton's CPU interpreter (3.9) does not
carry a rounding into the exponent.
"""

from __future__ import annotations

import torch

from kiln.kernels._triton import tl, triton

# kv_cache_dtype -> torch storage dtype (None: the model's dtype, no scales)
KV_CACHE_DTYPES = {
    "auto": None,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "int8": torch.int8,
}
QMAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
NO_QUANT, FP8, INT8 = 0, 1, 2  # the kernels' QUANT switch


def quant_kind(cache: torch.Tensor) -> int:
    """The kernels' QUANT constexpr for a cache tensor: NO_QUANT, FP8 or INT8."""
    return {torch.float8_e4m3fn: FP8, torch.int8: INT8}.get(cache.dtype, NO_QUANT)


def is_quantized(dtype: torch.dtype) -> bool:
    return dtype in QMAX


def layer_scales(k_scale: torch.Tensor, v_scale: torch.Tensor) -> torch.Tensor:
    """[4, Hkv] float32: k_scale, v_scale, 1 / k_scale, 1 / v_scale (see the module doc)."""
    s = torch.stack([k_scale, v_scale]).float()
    return torch.cat([s, 1.0 / s])


def quantize_ref(x: torch.Tensor, inv_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [..., Hkv, D] times inv_scale [Hkv], rounded (RNE) and saturated into `dtype`."""
    qmax = QMAX[dtype]
    y = (x.float() * inv_scale[:, None]).clamp(-qmax, qmax)
    return (y.round() if dtype == torch.int8 else y).to(dtype)


def dequantize_ref(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Stored values x [..., Hkv, D] times scale [Hkv], in float32, then cast to `dtype`."""
    return (x.float() * scale[:, None]).to(dtype)


@triton.jit
def _round_even(t):
    """Round |t| < 2**22 to the nearest integer, ties to even: add and subtract 1.5 * 2**23."""
    return (t + 12582912.0) - 12582912.0


@triton.jit
def quantize_kv(x, inv_scale, QUANT: tl.constexpr):
    """x * inv_scale in float32, rounded as quantize_ref rounds (still float32; the store
    casts it exactly). QUANT == NO_QUANT: x unchanged."""
    # One return: compiled Triton (not the interpreter) refuses a function whose constexpr
    # branches return different dtypes (x's bf16, the rounded float32) from early returns.
    if QUANT == 0:
        out = x
    elif QUANT == 1:  # e4m3: 3 mantissa bits; below 2**-6 the subnormals' fixed 2**-9 spacing
        y = tl.minimum(tl.maximum(x.to(tl.float32) * inv_scale, -448.0), 448.0)
        e = tl.maximum((y.to(tl.int32, bitcast=True) >> 23) & 0xFF, 127 - 6)
        ulp = ((e - 3) << 23).to(tl.float32, bitcast=True)
        inv_ulp = ((257 - e) << 23).to(tl.float32, bitcast=True)
        r = _round_even(y * inv_ulp) * ulp
        out = tl.where(r == 0.0, y * 0.0, r)  # what rounds to zero keeps its sign
    else:
        y = x.to(tl.float32) * inv_scale
        out = _round_even(tl.minimum(tl.maximum(y, -127.0), 127.0))
    return out


@triton.jit
def load_scales(scales_ptr, kv_head, num_kv_heads, QUANT: tl.constexpr):
    """(k_scale, v_scale) of one kv head (1.0, 1.0 without quantization)."""
    k_scale, v_scale = 1.0, 1.0
    if QUANT != 0:
        k_scale = tl.load(scales_ptr + kv_head)
        v_scale = tl.load(scales_ptr + num_kv_heads + kv_head)
    return k_scale, v_scale
