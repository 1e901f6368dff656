"""quantize(): load a model, quantize its decoder Linears (RTN or GPTQ), write a GPTQ checkpoint.

GPTQ runs block by block: the calibration activations enter block i as block i-1 (already
quantized) left them, each Linear's Hessian is gathered from one pass through the block, its
weights are quantized, and a second pass gives the next block's inputs.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from kiln.errors import InputError
from kiln.model.attention import DENSE_CAUSAL
from kiln.model.loader import load_model
from kiln.model.quantized import IntWeight
from kiln.model.transformer import Transformer
from kiln.quant.calibration import calibration_ids
from kiln.quant.checkpoint import save_quantized
from kiln.quant.gptq import Hessian, quantize_gptq
from kiln.quant.rtn import check_shape, quantize_rtn

METHODS = ("rtn", "gptq")
LATER = ("awq", "smoothquant", "fp8")
PERCDAMP = 0.01
CALIB_BATCH = 8  # calibration samples per forward pass


def quantize(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    method: str = "rtn",
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    act_order: bool = False,
    calib: str | os.PathLike | None = None,
    calib_samples: int = 128,
    calib_len: int = 512,
    progress: bool = False,
) -> Path:
    """Quantize the model in model_dir and write it to out_dir as a GPTQ (v1) checkpoint."""
    if method in LATER:
        raise InputError(f"--method {method} is not implemented yet (rtn, gptq)", param="method")
    if method not in METHODS:
        raise InputError(f"--method {method!r} is unknown; choose rtn or gptq", param="method")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists():
        raise InputError(f"--out {str(out_dir)!r} already exists", param="out")
    model = load_model(model_dir, dtype="float32", device="cpu")
    if model.config.model_type == "gpt2":
        raise InputError("quantize does not support gpt2 (its fused c_attn) yet", param="model")
    for i, layer in enumerate(model.layers):
        for name, lin in linears(layer).items():
            check_shape(f"layers.{i}.{name}", lin.in_features, lin.out_features, bits, group_size)
    if method == "gptq":
        from kiln.tokenizer.hf import load_tokenizer

        if calib_len > model.config.max_position_embeddings:
            raise InputError(
                f"--calib-len {calib_len} exceeds the model's context of "
                f"{model.config.max_position_embeddings}",
                param="calib_len",
            )
        ids = calibration_ids(load_tokenizer(model_dir), calib, calib_samples, calib_len)
        weights = gptq_model(model, ids, bits, group_size, sym, act_order, progress)
    else:
        weights = rtn_model(model, bits, group_size, sym, progress)
    quantization_config = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": act_order,
        "sym": sym,
        "damp_percent": PERCDAMP,
        "true_sequential": False,
        "static_groups": False,
        "checkpoint_format": "gptq",
    }
    return save_quantized(model, weights, quantization_config, model_dir, out_dir)


def linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The Linears of a block that get quantized (all but an MoE router)."""
    return {
        n: m
        for n, m in layer.named_modules()
        if isinstance(m, nn.Linear) and not n.endswith("mlp.gate")
    }


def rtn_model(model: Transformer, bits, group_size, sym, progress) -> dict[str, IntWeight]:
    """Round every decoder Linear to its nearest grid point; kiln name prefix -> IntWeight."""
    out = {}
    for i, layer in enumerate(tqdm(model.layers, desc="rtn", unit="layer", disable=not progress)):
        for name, lin in linears(layer).items():
            out[f"layers.{i}.{name}"] = quantize_rtn(lin.weight.detach(), bits, group_size, sym)
    return out


@torch.no_grad()
def gptq_model(
    model: Transformer, ids: torch.Tensor, bits, group_size, sym, act_order, progress
) -> dict[str, IntWeight]:
    """GPTQ every decoder Linear on calibration ids [samples, len], block by block; the model's
    weights become the dequantized ones as it goes."""
    positions = torch.arange(ids.shape[1]).expand(CALIB_BATCH, -1)
    x = model.embed_tokens(ids)  # [samples, len, hidden]
    if model.embed_positions is not None:
        x = x + model.embed_positions(positions[: len(ids)])

    def run(layer):
        return torch.cat(
            [
                layer(c, positions[: len(c)], model.rotary, DENSE_CAUSAL)
                for c in x.split(CALIB_BATCH)
            ]
        )

    out = {}
    for i, layer in enumerate(tqdm(model.layers, desc="gptq", unit="layer", disable=not progress)):
        targets = linears(layer)
        hessians = {n: Hessian(m.in_features) for n, m in targets.items()}
        hooks = [
            m.register_forward_hook(lambda mod, inp, res, h=hessians[n]: h.add(inp[0]))
            for n, m in targets.items()
        ]
        try:
            run(layer)
        finally:
            for h in hooks:
                h.remove()
        for name, lin in targets.items():
            h = hessians[name]
            w = lin.weight.detach()
            if h.n:  # an MoE expert no calibration token reached falls back to RTN
                q = quantize_gptq(w, h.h, bits, group_size, sym, act_order, PERCDAMP)
            else:
                q = quantize_rtn(w, bits, group_size, sym)
            lin.weight.copy_(q.dequantize())
            out[f"layers.{i}.{name}"] = q
        x = run(layer)
    return out
