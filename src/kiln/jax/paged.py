"""A paged KV cache in JAX and the batched greedy decode loop it drives.

The pool has kiln.engine's layout, one [num_blocks, block_size, Hkv, D] page pool a layer
(here stacked: [L, num_blocks, block_size, Hkv, D]): token t of a sequence lives in block
block_table[t // block_size] at offset t % block_size, its slot block * block_size + offset.
Sequences of different lengths decode together; each prompt is prefilled on its own, its K/V
scattered into its pages, then every step gathers each sequence's pages by its block table.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kiln.errors import InputError
from kiln.jax.attention import causal_attention, causal_mask, masked_attention
from kiln.jax.generate import check_lengths, greedy_step
from kiln.jax.model import Model


def paged_decode_attention(
    q, k_pool, v_pool, block_tables, context_lens, scale: float, sliding_window=None
):
    """q [B, Hq, D], each at position context_lens[b] - 1, over its pages -> [B, Hq, D]
    (kiln.kernels.paged_decode_attention_ref in JAX). k_pool, v_pool [num_blocks, block_size,
    Hkv, D]; block_tables [B, max_blocks] (entries past a sequence's length are never seen)."""
    b, max_blocks = block_tables.shape
    _, block_size, hkv, d = k_pool.shape
    keys = k_pool[block_tables].reshape(b, max_blocks * block_size, hkv, d)  # the gather
    values = v_pool[block_tables].reshape(b, max_blocks * block_size, hkv, d)
    q_pos = (context_lens - 1)[:, None]  # [B, 1]
    mask = causal_mask(q_pos, jnp.arange(max_blocks * block_size), sliding_window)
    return masked_attention(q[:, None], keys, values, scale, mask)[:, 0]


class PagedKVCache:
    """Paged backend: the step's new K/V go to their slots (slot_mapping [B * T]); a prefill
    (no block tables) attends over its own K/V, a decode step (T = 1) over each sequence's
    pages."""

    def __init__(self, k, v, slot_mapping, block_tables=None, context_lens=None, attention_fn=None):
        self.k, self.v = k, v  # [L, num_blocks, block_size, Hkv, D]
        self.slot_mapping = slot_mapping
        self.block_tables, self.context_lens = block_tables, context_lens
        self.attention_fn = attention_fn or causal_attention

    def _store(self, pool, layer_idx, new):
        layers, blocks, block_size, hkv, d = pool.shape
        flat = pool.reshape(layers, blocks * block_size, hkv, d)
        flat = flat.at[layer_idx, self.slot_mapping].set(new.reshape(-1, hkv, d).astype(pool.dtype))
        return flat.reshape(pool.shape)

    def attend(self, layer_idx, q, k, v, scale, sliding_window):
        self.k = self._store(self.k, layer_idx, k)
        self.v = self._store(self.v, layer_idx, v)
        if self.block_tables is None:
            return self.attention_fn(q, k, v, scale, 0, sliding_window)
        out = paged_decode_attention(
            q[:, 0], self.k[layer_idx], self.v[layer_idx], self.block_tables,
            self.context_lens, scale, sliding_window,
        )  # fmt: skip
        return out[:, None]


class BlockTables:
    """Which blocks each sequence holds, handed out from a free list as the sequences grow."""

    def __init__(self, num_seqs: int, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.free = list(range(num_blocks - 1, -1, -1))
        self.tables: list[list[int]] = [[] for _ in range(num_seqs)]

    def slots(self, seq: int, start: int, count: int) -> list[int]:
        """The slots of tokens [start, start + count) of `seq`, allocating blocks they need."""
        table, bs = self.tables[seq], self.block_size
        while len(table) * bs < start + count:
            if not self.free:
                raise InputError("the paged KV pool is out of blocks")
            table.append(self.free.pop())
        return [table[t // bs] * bs + t % bs for t in range(start, start + count)]

    def padded(self, width: int) -> np.ndarray:
        """[num_seqs, width] int32, unused entries 0 (masked by the context lengths)."""
        out = np.zeros((len(self.tables), width), np.int32)
        for i, table in enumerate(self.tables):
            out[i, : len(table)] = table
        return out


def paged_generate(
    model: Model,
    prompts: list[list[int]],
    max_new_tokens: int,
    block_size: int = 16,
    num_blocks: int | None = None,
) -> list[list[int]]:
    """Greedy continuations of prompts of any lengths, decoded as one batch over a paged KV
    pool: each prompt followed by its max_new_tokens tokens."""
    for p in prompts:
        check_lengths(model, len(p), max_new_tokens)
    if max_new_tokens == 0:
        return [list(p) for p in prompts]
    width = -(-(max(map(len, prompts)) + max_new_tokens) // block_size)
    num_blocks = num_blocks or sum(-(-(len(p) + max_new_tokens) // block_size) for p in prompts)
    c = model.config
    shape = (c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim)
    k, v = jnp.zeros(shape, model.dtype), jnp.zeros(shape, model.dtype)
    blocks = BlockTables(len(prompts), num_blocks, block_size)
    firsts = []
    for seq, prompt in enumerate(prompts):  # one prefill a prompt: their lengths differ
        slots = jnp.asarray(blocks.slots(seq, 0, len(prompt)), jnp.int32)
        token, k, v = _prefill(model, jnp.asarray([prompt], jnp.int32), k, v, slots)
        firsts.append(token)
    tokens = [jnp.concatenate(firsts)]  # [B] a step, left on the device
    lengths = np.array([len(p) for p in prompts])  # each sequence's position of tokens[-1]
    for _ in range(max_new_tokens - 1):
        slots = [blocks.slots(seq, int(n), 1)[0] for seq, n in enumerate(lengths)]
        token, k, v = _decode_step(
            model, tokens[-1], k, v, jnp.asarray(lengths, jnp.int32),
            jnp.asarray(slots, jnp.int32), jnp.asarray(blocks.padded(width)),
        )  # fmt: skip
        tokens.append(token)
        lengths += 1
    new = np.asarray(jnp.stack(tokens, axis=1))
    return [list(p) + new[i].tolist() for i, p in enumerate(prompts)]


@functools.partial(jax.jit, donate_argnums=(2, 3))
def _prefill(model: Model, ids, k, v, slot_mapping):
    cache = PagedKVCache(k, v, slot_mapping, attention_fn=model.attention_fn)
    return greedy_step(model, ids, None, cache)


@functools.partial(jax.jit, donate_argnums=(2, 3))
def _decode_step(model: Model, tokens, k, v, positions, slot_mapping, block_tables):
    """tokens [B] at positions [B]: each sequence's context is positions + 1 tokens."""
    cache = PagedKVCache(k, v, slot_mapping, block_tables, positions + 1)
    return greedy_step(model, tokens[:, None], positions[:, None], cache)
