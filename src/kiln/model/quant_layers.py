"""Quantized Linear layers that keep their weights packed on the device, and the loader's hook:
which layer a checkpoint's `quantization_config` gets.

`quant_layer_factory(spec, quantization, config)` maps a quantization_config (a QuantSpec,
kiln.model.quantized) and the user's `quantization` choice to a LayerFactory, a function
(parts, bias) -> nn.Module building one Linear from its checkpoint tensors (`qweight`, `qzeros`,
...), or None to dequantize at load time (the reference path). Other methods plug in by adding
their factory to LAYER_FACTORIES under their quant_method.

QuantLinear (GPTQ, AWQ: weight-only int4 / int8) multiplies through `self.matmul`: the torch
reference (kiln.kernels.quant_linear.quant_matmul_ref: dequantize, then F.linear) until the
engine binds its Ops' choice (kiln.engine.fuse.bind_quant_ops).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kiln.config import ModelConfig
from kiln.errors import ConfigError
from kiln.kernels.quant_layout import PackedWeight, pack
from kiln.kernels.quant_linear import quant_matmul_ref
from kiln.model.quantized import QuantSpec, require_parts, unpack_awq, unpack_gptq

# parts (a Linear's checkpoint tensors by suffix, on the target device), bias -> the layer
LayerFactory = Callable[[dict[str, torch.Tensor], "torch.Tensor | None"], nn.Module]
DEQUANTIZE = "none"  # quantization= value: dequantize at load time (plain Linears)


class QuantLinear(nn.Module):
    """A Linear with a packed weight-only quantized weight (PackedWeight's tensors as buffers);
    forward(x [..., K]) -> [..., N] in x's dtype."""

    def __init__(self, w: PackedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.bits, self.chunk = w.bits, w.chunk
        self.in_features, self.out_features = w.in_features, w.out_features
        for name in ("qweight", "scales", "zeros", "perm"):
            self.register_buffer(name, getattr(w, name))
        self.bias = bias
        self.matmul: Callable = quant_matmul_ref

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(
            self.qweight, self.scales, self.zeros, self.perm, self.bits, self.chunk,
            self.in_features,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        kind = "sym" if self.zeros is None else "asym"
        order = ", act-order" if self.perm is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, {kind}, chunk={self.chunk}{order}"
        )


class ConcatLinear(nn.Module):
    """Linears run one after another, outputs concatenated (a fusion whose parts cannot be
    packed as one, e.g. act-order permutations that differ)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


def concat_quantized(parts: list[nn.Module]) -> nn.Module:
    """One QuantLinear whose outputs are the parts' outputs side by side (their packed tensors
    concatenated along N), where they share bits, chunk and input order; else ConcatLinear."""
    first = parts[0]
    same = all(
        isinstance(p, QuantLinear)
        and (p.bits, p.chunk, p.in_features) == (first.bits, first.chunk, first.in_features)
        and (p.perm is None) == (first.perm is None)
        and (p.perm is None or torch.equal(p.perm, first.perm))
        and (p.bias is None) == (first.bias is None)
        for p in parts
    )
    if not same:
        return ConcatLinear(parts)
    zeros = None
    if any(p.zeros is not None for p in parts):
        mid = 2.0 ** (first.bits - 1)
        zeros = torch.cat([p.zeros if p.zeros is not None else torch.full_like(p.scales, mid)
                           for p in parts])  # fmt: skip
    w = PackedWeight(
        torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]), zeros,
        first.perm, first.bits, first.chunk, first.in_features,
    )  # fmt: skip
    bias = None
    if first.bias is not None:
        bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    out = QuantLinear(w, bias)
    out.matmul = first.matmul
    return out


def weight_only_factory(spec: QuantSpec) -> LayerFactory:
    """GPTQ / AWQ tensors -> QuantLinear (unpacked by the format's reader, the exactness
    reference, then packed in the kernels' layout on the tensors' device)."""
    unpack = unpack_gptq if spec.method == "gptq" else unpack_awq

    def build(parts: dict[str, torch.Tensor], bias: torch.Tensor | None) -> nn.Module:
        w = unpack(parts, spec)
        packed = pack(w.q, w.scales, w.zeros, w.g_idx, w.bits, spec.group_size)
        return QuantLinear(packed, bias)

    return build


LAYER_FACTORIES: dict[str, Callable[[QuantSpec], LayerFactory]] = {
    "gptq": weight_only_factory,
    "awq": weight_only_factory,
}


def quant_layer_factory(
    spec: QuantSpec | None, quantization: str | None, config: ModelConfig
) -> LayerFactory | None:
    """The layer factory for a checkpoint's quantization_config (spec) under the user's
    `quantization` (None: as the checkpoint says; "none": dequantize at load time; a method
    name: that method, which must be the checkpoint's). None: plain Linears (dequantized)."""
    if quantization == DEQUANTIZE:
        return None
    known = sorted(LAYER_FACTORIES)
    if quantization is not None and quantization not in LAYER_FACTORIES:
        raise ConfigError(
            f"quantization={quantization!r} is unknown; choose {', '.join(known)} or 'none'"
        )
    if spec is None:
        if quantization is None:
            return None
        raise ConfigError(f"quantization={quantization!r}: the checkpoint is not quantized")
    if quantization is not None and quantization != spec.method:
        raise ConfigError(
            f"quantization={quantization!r} does not match the checkpoint's "
            f"quantization_config.quant_method {spec.method!r}"
        )
    if config.model_type == "gpt2":  # its fused, transposed c_attn: dequantized instead
        if quantization is None:
            return None
        raise ConfigError(f"quantization={quantization!r}: no packed layers for gpt2; use 'none'")
    return LAYER_FACTORIES[spec.method](spec)


def build_layer(
    make: LayerFactory, prefix: str, parts: dict[str, torch.Tensor], spec: QuantSpec, bias
) -> nn.Module:
    """make(parts, bias), with the checkpoint's problems named after the layer."""
    require_parts(prefix, parts)
    try:
        return make(parts, bias)
    except ValueError as e:
        raise ConfigError(
            f"{prefix}: {e} (quantization_config.group_size {spec.group_size}); load it "
            "with quantization='none'"
        ) from None
