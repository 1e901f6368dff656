"""Greedy generation in JAX over a contiguous KV cache: one jitted prefill, then one jitted
decode step a token (kiln.generate's plain loop, the reference the paged loop is checked
against)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kiln.errors import InputError
from kiln.jax.attention import DenseKVCache
from kiln.jax.model import Model, forward

CACHE_BUCKET = 64  # cache lengths round up to this, so that decode steps compile once a bucket


def generate(model: Model, ids, max_new_tokens: int) -> jax.Array:
    """Greedy continuation of ids [B, T] (rows of one length): [B, T + max_new_tokens] int32."""
    ids = jnp.asarray(np.atleast_2d(np.asarray(ids)), dtype=jnp.int32)
    batch, length = ids.shape
    check_lengths(model, length, max_new_tokens)
    if max_new_tokens == 0:
        return ids
    k, v = empty_cache(model, batch, -(-(length + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET)
    token, k, v = _prefill(model, ids, k, v)
    tokens = [token]
    for pos in range(length, length + max_new_tokens - 1):
        token, k, v = _decode_step(model, token, k, v, jnp.int32(pos))
        tokens.append(token)
    return jnp.concatenate([ids, jnp.stack(tokens, axis=1)], axis=1)


def check_lengths(model: Model, length: int, max_new_tokens: int) -> None:
    if length == 0:
        raise InputError("empty prompt: give at least one token")
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    context = model.config.max_position_embeddings
    if length + max_new_tokens > context:
        raise InputError(
            f"prompt ({length} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context of {context} tokens"
        )


def empty_cache(model: Model, batch: int, max_len: int) -> tuple[jax.Array, jax.Array]:
    """Zeroed K and V buffers [L, B, max_len, Hkv, D] in the model's dtype."""
    c = model.config
    shape = (c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim)
    return jnp.zeros(shape, model.dtype), jnp.zeros(shape, model.dtype)


def greedy_step(model: Model, ids, positions, cache):
    """Forward ids [B, T] through a cache backend: (the next token [B], the cache's K, V)."""
    logits = forward(model, ids, positions, backend=cache)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache.k, cache.v


@functools.partial(jax.jit, donate_argnums=(2, 3))
def _prefill(model: Model, ids, k, v):
    """The prompt's K/V into the empty cache; the first new token [B]."""
    cache = DenseKVCache(k, v, 0, prefill=True, attention_fn=model.attention_fn)
    return greedy_step(model, ids, None, cache)


@functools.partial(jax.jit, donate_argnums=(2, 3))
def _decode_step(model: Model, token, k, v, pos):
    """One token [B] at position pos (a traced scalar: one compile for every step)."""
    positions = jnp.full((token.shape[0], 1), pos)
    return greedy_step(model, token[:, None], positions, DenseKVCache(k, v, pos, prefill=False))
