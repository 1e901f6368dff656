"""INT8 weights in JAX, as a transformation of a loaded Model (gpt-fast style): every Linear of
the decoder layers (attention, MLP, each MoE expert) becomes int8 with one float32 scale per
output channel; embeddings, the LM head and the MoE router stay in the model's dtype.

Each channel's scale is calibrated rather than taken from its absmax: the clipping ratio (of a
grid from 1 down to MIN_CLIP) whose symmetric int8 grid gives the smallest squared error over
the channel's weights. Clipping a few outliers buys a finer step for all the others; at 8 bits
that pays only for wide, heavy-tailed channels (a few percent of the error), and the absmax
(ratio 1) stays a candidate, so calibration is never worse than it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kiln.jax.model import Model

QMAX = 127
MIN_CLIP = 0.8
NUM_CLIPS = 21  # ratios 1.00, 0.99, ..., 0.80
PROJECTIONS = ("q", "k", "v", "o")  # the attention Linears (beside them: the q/k norm weights)


def fake_quantize(w: jax.Array, scale: jax.Array) -> jax.Array:
    """w [..., in, out] rounded to the int8 grid of scale [..., out], in float."""
    return quantize_values(w, scale).astype(jnp.float32) * scale[..., None, :]


def quantize_values(w: jax.Array, scale: jax.Array) -> jax.Array:
    return jnp.clip(jnp.round(w / scale[..., None, :]), -QMAX, QMAX).astype(jnp.int8)


def absmax_scale(w: jax.Array) -> jax.Array:
    """The plain per-channel scale, absmax / 127 ([..., out]; 1 for an all-zero channel)."""
    absmax = jnp.abs(w).max(axis=-2)
    return jnp.where(absmax > 0, absmax / QMAX, 1.0)


@jax.jit
def calibrate_scale(w: jax.Array) -> jax.Array:
    """Per-output-channel scale [..., out] of w [..., in, out] minimizing the rounding error."""
    w = w.astype(jnp.float32)
    base = absmax_scale(w)

    def error(scale):
        return jnp.sum(jnp.square(fake_quantize(w, scale) - w), axis=-2)

    ratios = jnp.linspace(1.0, MIN_CLIP, NUM_CLIPS)

    def step(i, carry):
        best, best_err = carry
        scale = base * ratios[i]
        err = error(scale)
        return jnp.where(err < best_err, scale, best), jnp.minimum(err, best_err)

    return jax.lax.fori_loop(1, NUM_CLIPS, step, (base, error(base)))[0]


def quantize_linear(p: dict) -> dict:
    """{"w": [..., in, out] float, "b"?} -> {"w": int8, "scale": [..., out] float32, "b"?}."""
    scale = calibrate_scale(p["w"])
    return {**p, "w": quantize_values(p["w"].astype(jnp.float32), scale), "scale": scale}


def quantize_int8(model: Model) -> Model:
    """The model with every decoder-layer Linear in int8 (see the module docstring)."""
    layers = []
    for layer in model.params["layers"]:
        attn = {k: quantize_linear(p) if k in PROJECTIONS else p for k, p in layer["attn"].items()}
        mlp = {k: p if k == "router" else quantize_linear(p) for k, p in layer["mlp"].items()}
        layers.append({**layer, "attn": attn, "mlp": mlp})
    return model.replace(params={**model.params, "layers": layers})
