"""The flash forward as a Pallas kernel (Triton on NVIDIA GPUs; Pallas' interpreter on the CPU):
one program a (head, query block), looping over the key blocks it sees with an online
softmax. It writes each row's log-sum-exp beside the output, so the backward is kiln.jax.flash's
blockwise recomputation: the same O(T) gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kiln.jax.flash import Blocks, _by_heads, with_flash_backward


def pallas_attention(
    q, k, v, scale: float, q_offset: int = 0, sliding_window=None, block_q=64, block_k=64
):
    """kiln.jax.flash.flash_attention's contract, the forward in a Pallas kernel. Block sizes
    and the head dim must be powers of two >= 16 on a GPU."""
    return _by_heads(_pallas, q, k, v, scale, q_offset, sliding_window, block_q, block_k)


def interpret() -> bool:
    """Pallas compiles for GPUs; anywhere else its interpreter runs the kernel."""
    return jax.default_backend() != "gpu"


def _kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, tiles: Blocks):
    i = pl.program_id(1)
    q = q_ref[...].astype(jnp.float32) * scale  # [bq, D]

    def step(j, carry):
        acc, m, l = carry
        k = k_ref[pl.ds(j * tiles.bk, tiles.bk), :].astype(jnp.float32)  # [bk, D]
        v = v_ref[pl.ds(j * tiles.bk, tiles.bk), :].astype(jnp.float32)
        s = jnp.where(tiles.mask(i, j), q @ k.T, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe[:, None])
        alpha = jnp.exp(m - m_safe)
        return acc * alpha[:, None] + p @ v, m_new, l * alpha + p.sum(-1)

    init = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.full(q.shape[:1], -jnp.inf, jnp.float32),
        jnp.zeros(q.shape[:1], jnp.float32),
    )
    acc, m, l = lax.fori_loop(*tiles.key_range(i), step, init)
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)


def _forward(q, k, v, scale, tiles: Blocks):
    """(out [BH, Tq, D], lse [BH, Tq]) from the kernel, over inputs padded to whole blocks."""
    q, k, v = tiles.pad(q, tiles.bq), tiles.pad(k, tiles.bk), tiles.pad(v, tiles.bk)
    bh, tq_pad, d = q.shape
    tk_pad = k.shape[1]
    q_spec = pl.BlockSpec((None, tiles.bq, d), lambda b, i: (b, i, 0))
    kv_spec = pl.BlockSpec((None, tk_pad, d), lambda b, i: (b, 0, 0))
    out, lse = pl.pallas_call(
        functools.partial(_kernel, scale=scale, tiles=tiles),
        grid=(bh, tiles.nq),
        in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, pl.BlockSpec((None, tiles.bq), lambda b, i: (b, i))],
        out_shape=[
            jax.ShapeDtypeStruct((bh, tq_pad, d), q.dtype),
            jax.ShapeDtypeStruct((bh, tq_pad), jnp.float32),
        ],
        interpret=interpret(),
    )(q, k, v)
    return out[:, : tiles.tq], lse[:, : tiles.tq]


_pallas = with_flash_backward(_forward)
