"""Attention in JAX: the plain masked softmax (the reference every faster path is checked
against) and the backends the decoder calls, as in kiln.model.attention.

A backend is any object with

    attend(layer_idx, q, k, v, scale, sliding_window) -> out

called while the forward is traced: q [B, T, Hq, D], k and v [B, T, Hkv, D], out like q. A
backend that owns a cache swaps its arrays for updated ones as it goes (`DenseKVCache.k`), and
the jitted function returns them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

# attention_fn(q, k, v, scale, q_offset, sliding_window) -> out: kiln's causal_attention contract
AttentionFn = Callable[..., jax.Array]


def causal_mask(q_pos: jax.Array, k_pos: jax.Array, sliding_window: int | None) -> jax.Array:
    """Which keys each query sees: [..., Tq, Tk] from positions q_pos [..., Tq], k_pos [Tk]."""
    diff = q_pos[..., :, None] - k_pos
    mask = diff >= 0
    if sliding_window is not None:
        mask &= diff < sliding_window
    return mask


def masked_attention(q, k, v, scale: float, mask: jax.Array) -> jax.Array:
    """Softmax attention in float32 with GQA: q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D], mask
    [B or 1, Tq, Tk] -> [B, Tq, Hq, D]. Every query must see at least one key."""
    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, tq, hkv, hq // hkv, d).astype(jnp.float32)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32)) * scale
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32))
    return out.reshape(b, tq, hq, d).astype(q.dtype)


def causal_attention(q, k, v, scale: float, q_offset: int = 0, sliding_window=None):
    """Plain causal attention, kiln.kernels.causal_attention's contract: query i sits at
    position q_offset + i, keys at 0..Tk-1; q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D]."""
    q_pos = q_offset + jnp.arange(q.shape[1])
    mask = causal_mask(q_pos, jnp.arange(k.shape[1]), sliding_window)
    return masked_attention(q, k, v, scale, mask[None])


class DenseCausal:
    """Training / reference backend: causal attention within each row of a [B, T] batch."""

    def __init__(self, attention_fn: AttentionFn = causal_attention):
        self.attention_fn = attention_fn

    def attend(self, layer_idx, q, k, v, scale, sliding_window):
        return self.attention_fn(q, k, v, scale, 0, sliding_window)


class DenseKVCache:
    """Generation backend: one contiguous K/V buffer k, v [L, B, max_len, Hkv, D] for the
    attention layers, every row of the batch as long as the others. A forward writes its T
    tokens at `start`; a prefill (start 0) attends over its own K/V with `attention_fn`, a
    decode step over the buffer, masked to the tokens written so far."""

    def __init__(self, k, v, start, prefill: bool, attention_fn: AttentionFn = causal_attention):
        self.k, self.v, self.start = k, v, start
        self.prefill = prefill
        self.attention_fn = attention_fn

    def attend(self, layer_idx, q, k, v, scale, sliding_window):
        at = (layer_idx, 0, self.start, 0, 0)
        self.k = lax.dynamic_update_slice(self.k, k[None].astype(self.k.dtype), at)
        self.v = lax.dynamic_update_slice(self.v, v[None].astype(self.v.dtype), at)
        if self.prefill:
            return self.attention_fn(q, k, v, scale, 0, sliding_window)
        q_pos = self.start + jnp.arange(q.shape[1])
        mask = causal_mask(q_pos, jnp.arange(self.k.shape[2]), sliding_window)  # unwritten: future
        return masked_attention(q, self.k[layer_idx], self.v[layer_idx], scale, mask[None])
