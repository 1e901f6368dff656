"""Scales of a quantized (fp8 / int8) KV cache: value = stored * scale, one float32 per
(layer, kv head) for k and one for v (kiln.kernels.kv_quant holds the number formats).

Where they come from (the start-up log names which, and never uses 1.0 silently):
- the checkpoint's `model.layers.N.self_attn.k_scale` / `v_scale` (the names vLLM and TGI
  read; one scalar per layer or one per kv head; an older `kv_scale` serves both), when
  calculate_kv_scales is not True;
- otherwise calculated from the first prefill step: each head's largest |k| and |v| over the
  step's tokens, times HEADROOM (later tokens may be larger; fp8's range makes room cheap,
  int8 pays a bit of resolution for it), over the format's largest value. kiln does this by
  default when the checkpoint has no scales (vLLM falls back to 1.0 with a warning);
- calculate_kv_scales=False and no checkpoint scales: 1.0, with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.errors import CheckpointError
from kiln.kernels.kv_quant import QMAX
from kiln.model.hf_format import read_tensors, weight_files

log = logging.getLogger("kiln.engine")

HEADROOM = {torch.float8_e4m3fn: 2.0, torch.int8: 1.2}


@dataclass
class KVScales:
    """k_scale, v_scale [num_layers, num_kv_heads] float32 and where they came from."""

    k_scale: torch.Tensor
    v_scale: torch.Tensor
    source: str  # "checkpoint" | "calculated" | "default 1.0"


def read_kv_scales(path: Path, num_layers: int, num_kv_heads: int) -> KVScales | None:
    """The checkpoint's KV cache scales, None when it has none; a checkpoint with some layers'
    scales only, or scales of the wrong shape, is a CheckpointError."""
    found: dict[tuple[int, str], torch.Tensor] = {}
    for file in weight_files(path):
        for name, t in read_tensors(file):
            parts = name.removeprefix("model.").split(".")
            if len(parts) == 4 and parts[0] == "layers" and parts[2] == "self_attn":
                kind = parts[3]
                if kind in ("k_scale", "v_scale", "kv_scale"):
                    found[int(parts[1]), kind] = _per_head(name, t, num_kv_heads)
    if not found:
        return None
    k, v = [], []
    for layer in range(num_layers):
        both = found.get((layer, "kv_scale"))
        ks, vs = found.get((layer, "k_scale"), both), found.get((layer, "v_scale"), both)
        if ks is None or vs is None:
            raise CheckpointError(
                f"{path}: KV cache scales for some layers but not layers.{layer}.self_attn "
                "(k_scale and v_scale, or kv_scale)"
            )
        k.append(ks)
        v.append(vs)
    return KVScales(torch.stack(k), torch.stack(v), "checkpoint")


def _per_head(name: str, t: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    t = t.float().flatten()
    if t.numel() == 1:
        return t.expand(num_kv_heads).clone()
    if t.numel() != num_kv_heads:
        raise CheckpointError(
            f"tensor {name!r} has {t.numel()} values: a KV scale is one value or one per kv "
            f"head ({num_kv_heads})"
        )
    if not (t > 0).all():
        raise CheckpointError(f"tensor {name!r} holds a scale that is not positive")
    return t


def scale_from_amax(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The scale [Hkv] for a head whose largest magnitude is amax [Hkv] (never 0)."""
    return amax.float().clamp_min(1e-6) * HEADROOM[dtype] / QMAX[dtype]


def head_amax(x: torch.Tensor) -> torch.Tensor:
    """The largest |x| per kv head of x [N, Hkv, D]: [Hkv]."""
    return x.abs().amax(dim=(0, 2))


def describe(scales: KVScales) -> str:
    """One line for the log: the source and the range of the scales."""
    both = torch.cat([scales.k_scale.flatten(), scales.v_scale.flatten()])
    return (
        f"{scales.source} (k {scales.k_scale.min():.3g}..{scales.k_scale.max():.3g}, "
        f"v {scales.v_scale.min():.3g}..{scales.v_scale.max():.3g}; {both.numel()} scales)"
    )
