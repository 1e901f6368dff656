"""RoPE context extension as transformers defines it (modeling_rope_utils): YaRN and dynamic NTK.

Both feed RotaryEmbedding's cos/sin table (kiln.model.layers), which every attention path reads
(the model, the engine's fused RoPE kernels), so they need nothing else.

- YaRN: per-frequency blend of interpolated (inv_freq / factor) and extrapolated (inv_freq)
  frequencies along a linear ramp between the dimensions that rotate beta_fast and beta_slow
  times over the original context; cos and sin are scaled by the attention factor
  (0.1 ln(factor) + 1 by default, or DeepSeek's mscale / mscale_all_dim ratio).
- dynamic NTK: the base grows with the sequence length L past the original context C,
  base * (factor * L / C - (factor - 1)) ** (d / (d - 2)). transformers recomputes it for the
  longest position of each forward, so in token-by-token generation the token at position p
  is rotated with L = p + 1: that is this table's row p (rows before C: plain RoPE). A prompt
  longer than C that transformers prefills in one forward gets L = its length for every
  position instead; kiln keeps the per-position rule, so that a token's rotation does not
  depend on how the prompt was chunked. kiln's context for dynamic NTK is factor * C
  (kiln.config), as in vLLM.
"""

from __future__ import annotations

import math

import torch


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(head_dim: int, theta: float, scaling: dict) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim / 2] float32, attention factor), transformers' float32
    arithmetic step for step."""
    factor = scaling["factor"]
    attention = scaling.get("attention_factor")
    if attention is None:
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all:
            attention = _mscale(factor, mscale) / _mscale(factor, mscale_all)
        else:
            attention = _mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1
    old_ctx = scaling["original_max_position_embeddings"]
    d = head_dim

    def correction_dim(rotations: float) -> float:
        return d * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    pos_freqs = theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: the dimension keeps its frequency (fast rotations)
    return interpolation * (1 - keep) + extrapolation * keep, float(attention)


def dynamic_ntk_freqs(head_dim: int, theta: float, scaling: dict, num_positions: int):
    """Angles [num_positions, head_dim / 2] float32: row p rotates position p with the base
    for sequence length max(p + 1, C)."""
    d, factor = head_dim, scaling["factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    pos = torch.arange(num_positions, dtype=torch.float64)
    length = (pos + 1).clamp_min(old_ctx)
    base = theta * (factor * length / old_ctx - (factor - 1)) ** (d / (d - 2))  # [P]
    exponent = torch.arange(0, d, 2, dtype=torch.float64) / d
    inv_freq = (1.0 / base[:, None] ** exponent).float()  # [P, d / 2]
    return pos.float()[:, None] * inv_freq
