"""`kiln qat`: quantization-aware training. Every decoder Linear computes with its weight (and,
for W8A8, its input) rounded as the exported checkpoint will round it, while the gradient
passes through the rounding unchanged (the straight-through estimator):

    w_fq = w + (dequantize(quantize(w)) - w).detach()

The rounding is kiln quantize's own (kiln.quant.rtn for GPTQ's int4 / int8 grids,
kiln.model.w8a8 and kiln.kernels.quant_act for int8 W8A8), so the checkpoint written at the
end, a GPTQ or compressed-tensors one exactly as `kiln quantize` writes it, holds the weights
the model trained with, and the engine serves it with the fake-quant model's logits.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kiln.compress.config import QATConfig, TextData
from kiln.errors import InputError
from kiln.kernels.quant_act import quantize_rows_ref
from kiln.model.transformer import Transformer
from kiln.model.w8a8 import quantize_weight
from kiln.quant.quantize import linears, save_gptq, save_w8a8
from kiln.quant.rtn import check_shape, quantize_rtn
from kiln.train.config import FinetuneConfig


def quantized_weight(w: torch.Tensor, scheme: QATConfig):
    """w [out, in] as the checkpoint stores it: an IntWeight (GPTQ) or a W8A8Weight (int8)."""
    if scheme.act_bits:
        return quantize_weight(w, torch.int8)
    return quantize_rtn(w.detach(), scheme.bits, scheme.group_size, scheme.sym)


def straight_through(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """rounded's value with x's gradient."""
    return x + (rounded.to(x.dtype) - x).detach()


def fake_quant_input(x: torch.Tensor) -> torch.Tensor:
    """x [..., in] rounded to int8 per token, as W8A8Linear rounds its input."""
    xq, scale = quantize_rows_ref(x.detach().reshape(-1, x.shape[-1]), torch.int8)
    return straight_through(x, (xq.float() * scale).view_as(x))


class FakeQuantLinear(nn.Module):
    """A Linear (same weight and bias parameters, same names) computing with its weight, and
    for W8A8 its input, rounded to the scheme's grid; gradients straight through."""

    def __init__(self, linear: nn.Linear, scheme: QATConfig):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.scheme = scheme

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = straight_through(self.weight, quantized_weight(self.weight, self.scheme).dequantize())
        if self.scheme.act_bits:
            x = fake_quant_input(x)
        return F.linear(x, w, self.bias)


def check_scheme(model: Transformer, scheme: QATConfig) -> None:
    """InputError unless the scheme is one kiln quantize writes and fits every Linear."""
    if scheme.act_bits not in (0, 8):
        raise InputError(f"--act-bits {scheme.act_bits}: choose 0 or 8", param="act_bits")
    if scheme.act_bits and (scheme.bits, scheme.group_size, scheme.sym) != (8, -1, True):
        raise InputError(
            "--act-bits 8 trains int8 W8A8 (compressed-tensors): it needs --bits 8 "
            "--group-size -1 --sym",
            param="act_bits",
        )
    if model.config.model_type == "gpt2":
        raise InputError("qat exports as kiln quantize does, which does not take gpt2 yet")
    for i, layer in enumerate(model.layers):
        for name, lin in linears(layer).items():
            check_shape(
                f"layers.{i}.{name}", lin.in_features, lin.out_features, scheme.bits,
                scheme.group_size,
            )  # fmt: skip


def apply_qat(model: Transformer, scheme: QATConfig) -> Transformer:
    """Swap every decoder Linear (all but an MoE router; the LM head stays) for a
    FakeQuantLinear, in place."""
    for layer in model.layers:
        for name, lin in linears(layer).items():
            parent, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(parent), attr, FakeQuantLinear(lin, scheme))
    return model


def export_qat(model: Transformer, scheme: QATConfig, model_dir: Path, out_dir: Path) -> Path:
    """Write the QAT model as the checkpoint `kiln quantize` writes for its scheme: GPTQ
    (weight-only) or compressed-tensors int8 W8A8."""
    weights = {
        f"layers.{i}.{name}": quantized_weight(lin.weight.detach(), scheme)
        for i, layer in enumerate(model.layers)
        for name, lin in linears_of(layer).items()
    }
    if scheme.act_bits:
        return save_w8a8(model, weights, "int", model_dir, out_dir)
    return save_gptq(model, weights, model_dir, out_dir, scheme.bits, scheme.group_size, scheme.sym)


def linears_of(layer: nn.Module) -> dict[str, FakeQuantLinear]:
    """The FakeQuantLinears of a block, by name."""
    return {n: m for n, m in layer.named_modules() if isinstance(m, FakeQuantLinear)}


def qat(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    scheme: QATConfig | None = None,
    train: FinetuneConfig | None = None,
    data: TextData | None = None,
) -> dict:
    """Train the model in model_dir under fake quantization on corpus text, then write it to
    out_dir as kiln quantize would (its tokenizer beside it); the loop's result."""
    from kiln.compress.training import run_config, text_windows
    from kiln.model.loader import load_model
    from kiln.train.distributed import init, resolve_device
    from kiln.train.loop import train as train_loop
    from kiln.train.pretrain import lm_loss

    scheme, train, data = scheme or QATConfig(), train or FinetuneConfig(), data or TextData()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists():
        raise InputError(f"--out {str(out_dir)!r} already exists", param="out")
    model = load_model(model_dir, dtype="float32", device=resolve_device(train.device))
    check_scheme(model, scheme)
    if train.out_dir is None:  # beside OUT: the export renames a finished folder into OUT
        train = dataclasses.replace(train, out_dir=str(out_dir.with_name(out_dir.name + ".run")))
    cfg = run_config(train, out_dir, lr=2e-5)
    train_batch, val_batch, _ = text_windows(
        model_dir, data, model.config.max_position_embeddings, cfg
    )
    apply_qat(model, scheme).requires_grad_(True)
    result = train_loop(model, cfg, train_batch, lm_loss, val_batch)
    if init(cfg.device).is_main:
        model.requires_grad_(False).eval()
        result["export"] = str(export_qat(model, scheme, model_dir, out_dir))
    return result
