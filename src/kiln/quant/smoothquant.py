"""SmoothQuant (Xiao et al., 2023): activations of LLMs carry a few outlier channels that wreck
per-token int8 quantization, while weights are easy to quantize. Divide each input channel j of
the activations by

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

and multiply the weights' input column j by it: the product is unchanged, and the difficulty
moves from the activations into the weights (alpha = 0.5 splits it evenly). 1/s is folded into
the op that feeds the Linears (a norm's weight, or a Linear's output rows), as AWQ folds its
scales (kiln.quant.awq's scale groups), so the smoothed model runs with no extra op. Then the
weights are rounded to int8 per channel, the activations to int8 per token at run time.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from kiln.model.transformer import Transformer
from kiln.quant.awq import ScaleGroup, fold_scale, scale_groups

MIN_RANGE = 1e-5  # llm-compressor's floor for both ranges (a dead channel is left alone)


def smoothing_scale(x_absmax: torch.Tensor, linears: list[nn.Linear], alpha: float) -> torch.Tensor:
    """s [in] from the inputs' per-channel absmax [in] and the weights' (over every Linear)."""
    w_absmax = torch.cat([lin.weight.detach().abs() for lin in linears]).amax(0).float()
    x_absmax = x_absmax.float().clamp(min=MIN_RANGE)
    return x_absmax.pow(alpha) / w_absmax.clamp(min=MIN_RANGE).pow(1 - alpha)


@torch.no_grad()
def activation_absmax(
    model: Transformer, ids: torch.Tensor, linears: list[nn.Linear], batch: int, progress: bool
) -> dict[nn.Linear, torch.Tensor]:
    """Each Linear's per-input-channel absmax [in] over the calibration ids [samples, len]."""
    seen: dict[nn.Linear, torch.Tensor] = {}

    def record(mod, inp, out):
        m = inp[0].detach().abs().reshape(-1, inp[0].shape[-1]).amax(0).float()
        seen[mod] = torch.maximum(seen[mod], m) if mod in seen else m

    hooks = [lin.register_forward_hook(record) for lin in linears]
    try:
        for chunk in tqdm(ids.split(batch), desc="calibrate", unit="batch", disable=not progress):
            model(chunk)
    finally:
        for h in hooks:
            h.remove()
    return seen


@torch.no_grad()
def smooth_model(
    model: Transformer, ids: torch.Tensor, alpha: float, batch: int, progress: bool
) -> list[str]:
    """Fold SmoothQuant's scales into the model in place (its function unchanged); the groups
    left unsmoothed, with why. Groups are AWQ's: q/k/v after input_layernorm, o_proj after
    v_proj (no GQA), gate/up after post_attention_layernorm, down_proj after up_proj."""
    groups: list[ScaleGroup] = []
    skipped = []
    for i, layer in enumerate(model.layers):
        found, skip = scale_groups(layer, attention=None)
        groups += found
        skipped += [f"layers.{i}.{s}" for s in skip]
    absmax = activation_absmax(model, ids, [g.linears[0] for g in groups], batch, progress)
    for g in groups:
        fold_scale(g, smoothing_scale(absmax[g.linears[0]], g.linears, alpha))
    return skipped
