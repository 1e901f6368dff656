"""AWQ (Lin et al., 2023), as AutoAWQ runs it: before rounding, scale each input channel of the
Linears that share an input by s = mean|x|^alpha (the salient channels, those with large
activations, get finer steps), and fold 1/s into the op that feeds them (a norm's weight or a
Linear's output rows) so the model's function is unchanged. alpha is grid-searched per group on
calibration inputs, judged by the output of the module the group sits in. Then, as AutoAWQ's
clipping search does, each (output, group) of weights is clamped to the range whose rounding best
keeps that group's share of the Linear's output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kiln.model.layers import MLP
from kiln.quant.rtn import quantize_rtn

N_GRID = 20  # alpha in {0, 1/20, ..., 19/20}, AutoAWQ's grid (clipping: shrink by 1/20 steps)
NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")  # AutoAWQ leaves q/k unclipped


@dataclass
class ScaleGroup:
    """Linears sharing one input, the op before them that absorbs 1/s, and the module whose
    output judges a scale (called on the Linears' input)."""

    name: str  # the first Linear's name in its block: where its input is captured
    prev: nn.Module  # a norm (weight, maybe bias) or a Linear (output rows)
    linears: list[nn.Linear]
    inspect: Callable[[torch.Tensor], torch.Tensor]


def scale_groups(
    layer: nn.Module, attention: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[list[ScaleGroup], list[str]]:
    """The scale groups of a decoder block (AutoAWQ's llama layout) and, for the Linears left
    out, why; `attention` runs the block's self_attn on normed inputs."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    groups = [ScaleGroup("self_attn.q_proj", layer.input_layernorm, qkv, attention)]
    skipped = []
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:
        groups.append(ScaleGroup("self_attn.o_proj", attn.v_proj, [attn.o_proj], attn.o_proj))
    else:
        skipped.append("self_attn.o_proj (grouped-query attention: v_proj is narrower)")
    if not isinstance(mlp, MLP):
        skipped.append("mlp (MoE: the router would see the folded scale)")
        return groups, skipped
    ins = [mlp.gate_proj, mlp.up_proj] if mlp.gated else [mlp.up_proj]
    groups.append(ScaleGroup("mlp.up_proj", layer.post_attention_layernorm, ins, mlp))
    if mlp.gated:
        groups.append(ScaleGroup("mlp.down_proj", mlp.up_proj, [mlp.down_proj], mlp.down_proj))
    else:
        skipped.append("mlp.down_proj (a nonlinearity sits between up_proj and down_proj)")
    return groups, skipped


@torch.no_grad()
def search_scale(
    group: ScaleGroup, x: torch.Tensor, bits: int, group_size: int, sym: bool
) -> torch.Tensor:
    """The per-input-channel scale s [in] whose RTN-quantized W*s (then / s) keeps
    group.inspect(x) closest, in mean squared error, to its full-precision output."""
    x_mean = x.abs().reshape(-1, x.shape[-1]).float().mean(0)  # [in]
    ref = group.inspect(x)
    originals = [lin.weight.detach().clone() for lin in group.linears]
    best, best_loss = torch.ones_like(x_mean), float("inf")
    try:
        for step in range(N_GRID):
            s = x_mean.pow(step / N_GRID).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for lin, w in zip(group.linears, originals):
                q = quantize_rtn(w * s, bits, group_size, sym).dequantize()
                lin.weight.copy_(q / s)
            loss = (group.inspect(x) - ref).float().pow(2).mean().item()
            if loss < best_loss:
                best, best_loss = s, loss
    finally:
        for lin, w in zip(group.linears, originals):
            lin.weight.copy_(w)
    return best


@torch.no_grad()
def fold_scale(group: ScaleGroup, s: torch.Tensor) -> None:
    """Multiply the group's weights by s along their input and divide the previous op's output
    by s: the composition computes the same function."""
    prev = group.prev
    prev.weight.div_(s.view(-1, *[1] * (prev.weight.dim() - 1)))
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s)
    for lin in group.linears:
        lin.weight.mul_(s)


@torch.no_grad()
def search_clip(
    w: torch.Tensor,
    x: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    max_shrink: float = 0.5,
    n_tokens: int = 512,
    rows: int = 256,
) -> torch.Tensor:
    """w [out, in] with each (output, group) clamped to the +-max, shrunk from |w|'s max by up
    to max_shrink, whose RTN rounding best keeps that group's share of the output on inputs
    x [..., in] (about n_tokens of them, AutoAWQ's sample); `rows` outputs at a time."""
    out_f, in_f = w.shape
    size = in_f if group_size == -1 else group_size
    x = x.reshape(-1, in_f).float()
    x = x[:: max(1, len(x) // n_tokens)].view(-1, in_f // size, size)  # [tokens, groups, size]
    clipped = []
    for wg in w.float().view(out_f, -1, size).split(rows):  # [rows, groups, size]
        ref = torch.einsum("tgs,ogs->otg", x, wg)
        org_max = wg.abs().amax(-1, keepdim=True)  # [rows, groups, 1]
        best_max, best_err = org_max.clone(), torch.full_like(org_max, float("inf"))
        for step in range(int(max_shrink * N_GRID)):
            m = org_max * (1 - step / N_GRID)
            cur = wg.clamp(-m, m).view(len(wg), in_f)
            q = quantize_rtn(cur, bits, group_size, sym).dequantize().view_as(wg)
            err = (torch.einsum("tgs,ogs->otg", x, q) - ref).pow(2).mean(1)[..., None]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better, m, best_max)
        clipped.append(wg.clamp(-best_max, best_max).view(len(wg), in_f))
    return torch.cat(clipped).to(w.dtype)
