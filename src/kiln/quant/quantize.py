"""quantize(): load a model, quantize its decoder Linears (RTN, GPTQ or AWQ), write a GPTQ
checkpoint (AWQ: an AutoAWQ GEMM one); or, for W8A8 (SmoothQuant int8, FP8), a compressed-tensors
one.

GPTQ runs block by block: the calibration activations enter block i as block i-1 (already
quantized) left them, each Linear's Hessian is gathered from one pass through the block, its
weights are quantized, and a second pass gives the next block's inputs. AWQ also runs block by
block, but as AutoAWQ does, the next block's inputs are the full-precision block's outputs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from kiln.errors import InputError
from kiln.model.attention import DENSE_CAUSAL
from kiln.model.compressed_tensors import compressed_tensors_config
from kiln.model.loader import load_model
from kiln.model.quantized import IntWeight, pack_awq, pack_gptq
from kiln.model.transformer import Transformer
from kiln.model.w8a8 import QDTYPES, W8A8Weight, quantize_weight
from kiln.quant.awq import NO_CLIP, fold_scale, scale_groups, search_clip, search_scale
from kiln.quant.calibration import calibration_ids
from kiln.quant.checkpoint import save_quantized
from kiln.quant.gptq import Hessian, quantize_gptq
from kiln.quant.rtn import check_shape, quantize_rtn
from kiln.quant.smoothquant import smooth_model

WEIGHT_ONLY = ("rtn", "gptq", "awq")
W8A8 = {"smoothquant": "int", "fp8": "float"}  # method -> compressed-tensors `type`
METHODS = (*WEIGHT_ONLY, *W8A8)
PERCDAMP = 0.01
CALIB_BATCH = 8  # calibration samples per forward pass


def quantize(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    method: str = "rtn",
    bits: int | None = None,
    group_size: int | None = None,
    sym: bool | None = None,
    act_order: bool = False,
    calib: str | os.PathLike | None = None,
    calib_samples: int = 128,
    calib_len: int = 512,
    alpha: float | None = None,
    device: str | None = None,
    progress: bool = False,
) -> Path:
    """Quantize the model in model_dir and write it to out_dir as a GPTQ (v1) checkpoint, for
    method "awq" an AutoAWQ GEMM one, for "smoothquant" (int8) and "fp8" a compressed-tensors
    W8A8 one. bits default 4 (W8A8: 8), group_size 128 (W8A8: per channel); sym defaults to
    True, for AWQ to False (zero point); alpha (SmoothQuant's migration strength) to 0.5.
    Calibration and the algorithms run on `device` (default: the CPU)."""
    if method not in METHODS:
        raise InputError(
            f"--method {method!r} is unknown; choose {', '.join(METHODS)}", param="method"
        )
    if method in W8A8:
        check_w8a8_options(method, bits, group_size, sym, act_order, calib, alpha)
        return quantize_w8a8(
            model_dir, out_dir, method, calib, calib_samples, calib_len, alpha, device, progress
        )
    if alpha is not None:
        raise InputError(f"--alpha is SmoothQuant's; --method {method} takes none", param="alpha")
    bits = 4 if bits is None else bits
    group_size = 128 if group_size is None else group_size
    if method == "awq" and bits != 4:
        raise InputError(f"--bits {bits}: AWQ GEMM checkpoints are 4-bit", param="bits")
    sym = method != "awq" if sym is None else sym
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model = load_source(model_dir, out_dir, device)
    for i, layer in enumerate(model.layers):
        for name, lin in linears(layer).items():
            check_shape(f"layers.{i}.{name}", lin.in_features, lin.out_features, bits, group_size)
    if method in ("gptq", "awq"):
        ids = calibration(model, model_dir, calib, calib_samples, calib_len)
    if method == "awq":
        weights, skipped = awq_model(model, ids, bits, group_size, sym, progress)
        if progress and skipped:
            print(f"awq: no scale search for {', '.join(skipped)}", file=sys.stderr)
        awq_config = {
            "quant_method": "awq",
            "version": "gemm",
            "bits": bits,
            "group_size": group_size,
            "zero_point": True,
            "modules_to_not_convert": None,
        }
        return save_quantized(model, weights, awq_config, model_dir, out_dir, pack_awq)
    if method == "gptq":
        weights = gptq_model(model, ids, bits, group_size, sym, act_order, progress)
    else:
        weights = rtn_model(model, bits, group_size, sym, progress)
    return save_gptq(model, weights, model_dir, out_dir, bits, group_size, sym, act_order)


def save_gptq(
    model: Transformer,
    weights: dict[str, IntWeight],
    model_dir: Path,
    out_dir: Path,
    bits: int,
    group_size: int,
    sym: bool,
    act_order: bool = False,
) -> Path:
    """Write `weights` (kiln name prefix -> IntWeight) and the rest of the model as a GPTQ
    (v1) checkpoint."""
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
    return save_quantized(model, weights, quantization_config, model_dir, out_dir, pack_gptq)


def load_source(model_dir: Path, out_dir: Path, device: str | None) -> Transformer:
    """The float32 model to quantize, on `device` (default: the CPU); InputError if out_dir
    exists or the family is gpt2."""
    if out_dir.exists():
        raise InputError(f"--out {str(out_dir)!r} already exists", param="out")
    model = load_model(model_dir, dtype="float32", device=device or "cpu")
    if model.config.model_type == "gpt2":
        raise InputError("quantize does not support gpt2 (its fused c_attn) yet", param="model")
    return model


def calibration(model: Transformer, model_dir: Path, calib, samples: int, length: int):
    """The calibration ids [samples, length] (the model's own tokenizer), on its device."""
    from kiln.tokenizer.hf import load_tokenizer

    if length > model.config.max_position_embeddings:
        raise InputError(
            f"--calib-len {length} exceeds the model's context of "
            f"{model.config.max_position_embeddings}",
            param="calib_len",
        )
    ids = calibration_ids(load_tokenizer(model_dir), calib, samples, length)
    return ids.to(model.embed_tokens.weight.device)


def check_w8a8_options(method, bits, group_size, sym, act_order, calib, alpha) -> None:
    """InputError naming an option the W8A8 methods (8-bit, per channel, symmetric) refuse."""
    if bits not in (None, 8):
        raise InputError(f"--bits {bits}: --method {method} is 8-bit (W8A8)", param="bits")
    if group_size not in (None, -1):
        raise InputError(
            f"--group-size {group_size}: --method {method} scales each output channel",
            param="group_size",
        )
    if sym is False:
        raise InputError(f"--asym: --method {method} is symmetric", param="sym")
    if act_order:
        raise InputError(f"--act-order is GPTQ's; --method {method} takes none", param="act_order")
    if method == "fp8" and calib is not None:
        raise InputError("--calib: --method fp8 needs no calibration", param="calib")
    if method == "fp8" and alpha is not None:
        raise InputError("--alpha is SmoothQuant's; --method fp8 takes none", param="alpha")
    if alpha is not None and not 0 <= alpha <= 1:
        raise InputError(f"--alpha {alpha} must be in [0, 1]", param="alpha")


def quantize_w8a8(
    model_dir, out_dir, method, calib, calib_samples, calib_len, alpha, device, progress
) -> Path:
    """SmoothQuant int8 or FP8: per-channel 8-bit weights (SmoothQuant's scales folded first),
    written as a compressed-tensors checkpoint whose activations are quantized per token."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model = load_source(model_dir, out_dir, device)
    if method == "smoothquant":
        ids = calibration(model, model_dir, calib, calib_samples, calib_len)
        alpha = 0.5 if alpha is None else alpha
        skipped = smooth_model(model, ids, alpha, CALIB_BATCH, progress)
        if progress and skipped:
            print(f"smoothquant: no smoothing for {', '.join(skipped)}", file=sys.stderr)
    dtype = QDTYPES[W8A8[method]]
    weights = {}
    for i, layer in enumerate(tqdm(model.layers, desc=method, unit="layer", disable=not progress)):
        for name, lin in linears(layer).items():
            weights[f"layers.{i}.{name}"] = quantize_weight(lin.weight, dtype)
    return save_w8a8(model, weights, W8A8[method], model_dir, out_dir)


def save_w8a8(
    model: Transformer, weights: dict[str, W8A8Weight], type_: str, model_dir: Path, out_dir: Path
) -> Path:
    """Write `weights` (kiln name prefix -> W8A8Weight of compressed-tensors `type_`, "int" or
    "float") and the rest of the model as a compressed-tensors W8A8 checkpoint (per-token
    dynamic activations)."""
    router = "re:.*(block_sparse_moe|mlp)[.]gate$"  # Mixtral's and Qwen3-MoE's router
    ignore = ["lm_head"] + ([router] if model.config.num_experts else [])
    config = compressed_tensors_config(type_, ignore)
    return save_quantized(model, weights, config, model_dir, out_dir, pack_w8a8)


def pack_w8a8(w: W8A8Weight) -> dict[str, torch.Tensor]:
    """A W8A8 Linear's compressed-tensors tensors."""
    return {"weight": w.weight.contiguous(), "weight_scale": w.weight_scale.contiguous()}


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


def block_runner(model: Transformer, ids: torch.Tensor):
    """The embedded calibration ids [samples, len, hidden] and run(fn, x): fn(chunk, positions)
    over CALIB_BATCH samples at a time, concatenated."""
    positions = torch.arange(ids.shape[1], device=ids.device).expand(CALIB_BATCH, -1)
    x = model.embed_tokens(ids)  # [samples, len, hidden]
    if model.embed_positions is not None:
        x = x + model.embed_positions(positions[: len(ids)])

    def run(fn, x):
        return torch.cat([fn(c, positions[: len(c)]) for c in x.split(CALIB_BATCH)])

    return x, run


Stat = Callable[[str, nn.Linear], Any]  # (name in its block, Linear) -> statistic or None


@torch.no_grad()
def calibrate_blocks(
    model: Transformer, ids: torch.Tensor, stat: Stat, desc: str, progress
) -> Iterator[tuple[int, dict[str, tuple[nn.Linear, Any]]]]:
    """Block by block, (i, {name: (Linear, its statistic)}) over the decoder Linears of block
    i that `stat(name, linear)` gives a statistic (an object with add(x)) for, each fed the
    inputs that Linear sees on calibration ids [samples, len]. The caller may change the
    block's weights before asking for the next: the next block's inputs are the changed
    block's outputs (GPTQ's and SparseGPT's sequential order)."""
    x, run = block_runner(model, ids)
    for i, layer in enumerate(tqdm(model.layers, desc=desc, unit="layer", disable=not progress)):
        found = {n: (m, stat(n, m)) for n, m in linears(layer).items()}
        found = {n: (m, s) for n, (m, s) in found.items() if s is not None}
        hooks = [
            m.register_forward_hook(lambda mod, inp, res, s=s: s.add(inp[0]))
            for m, s in found.values()
        ]
        try:
            run(block(model, layer), x)
        finally:
            for h in hooks:
                h.remove()
        yield i, found
        x = run(block(model, layer), x)


@torch.no_grad()
def gptq_model(
    model: Transformer, ids: torch.Tensor, bits, group_size, sym, act_order, progress
) -> dict[str, IntWeight]:
    """GPTQ every decoder Linear on calibration ids [samples, len], block by block; the model's
    weights become the dequantized ones as it goes."""
    out = {}
    hessian = lambda name, m: Hessian(m.in_features, m.weight.device)  # noqa: E731
    for i, found in calibrate_blocks(model, ids, hessian, "gptq", progress):
        for name, (lin, h) in found.items():
            w = lin.weight.detach()
            if h.n:  # an MoE expert no calibration token reached falls back to RTN
                q = quantize_gptq(w, h.h, bits, group_size, sym, act_order, PERCDAMP)
            else:
                q = quantize_rtn(w, bits, group_size, sym)
            lin.weight.copy_(q.dequantize())
            out[f"layers.{i}.{name}"] = q
    return out


def block(model: Transformer, layer: nn.Module):
    """layer's forward as fn(x, positions)."""
    return lambda c, pos: layer(c, pos, model.rotary, DENSE_CAUSAL)


@torch.no_grad()
def awq_model(
    model: Transformer, ids: torch.Tensor, bits, group_size, sym, progress
) -> tuple[dict[str, IntWeight], list[str]]:
    """AWQ every decoder Linear on calibration ids [samples, len], block by block: search and
    fold each scale group's input scale into the model, search each Linear's clipping, then
    round; also the Linears whose scale search was skipped, with why."""
    x, run = block_runner(model, ids)
    out, skipped = {}, []
    for i, layer in enumerate(tqdm(model.layers, desc="awq", unit="layer", disable=not progress)):

        def attention(h, layer=layer):
            return run(lambda c, pos: layer.self_attn(c, pos, model.rotary, DENSE_CAUSAL), h)

        groups, skip = scale_groups(layer, attention)
        skipped += [f"layers.{i}.{s}" for s in skip]
        named = dict(layer.named_modules())
        captured = {g.name for g in groups} | ({"self_attn.o_proj", "mlp.down_proj"} & set(named))
        feats: dict[str, list[torch.Tensor]] = {n: [] for n in captured}
        hooks = [
            named[n].register_forward_hook(lambda mod, inp, res, f=f: f.append(inp[0]))
            for n, f in feats.items()
        ]
        try:
            x_next = run(block(model, layer), x)
        finally:
            for h in hooks:
                h.remove()
        inputs = {named[n]: torch.cat(f) for n, f in feats.items()}  # Linear -> its input
        scales = [search_scale(g, inputs[named[g.name]], bits, group_size, sym) for g in groups]
        for g, s in zip(groups, scales):
            x_in = inputs[named[g.name]] / s  # what the Linears see once s is folded
            fold_scale(g, s)
            inputs |= {lin: x_in for lin in g.linears}
        for name, lin in linears(layer).items():
            if lin in inputs and name not in NO_CLIP:
                lin.weight.copy_(search_clip(lin.weight, inputs[lin], bits, group_size, sym))
            out[f"layers.{i}.{name}"] = quantize_rtn(lin.weight.detach(), bits, group_size, sym)
        x = x_next
    return out, skipped
