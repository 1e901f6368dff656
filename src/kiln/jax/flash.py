"""FlashAttention in pure JAX: causal attention a block of queries against a block of keys at a
time with an online softmax, so that no [Tq, Tk] score matrix is ever held. The backward
(custom VJP) keeps only q, k, v, the output and each row's log-sum-exp, and recomputes the
scores block by block: memory O(T), not O(T^2).

Same contract as kiln.jax.attention.causal_attention: q [B, Tq, Hq, D] at positions q_offset..,
k and v [B, Tk, Hkv, D] at 0..Tk-1, an optional sliding window.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

BLOCK_Q = 64
BLOCK_K = 64


def flash_attention(
    q, k, v, scale: float, q_offset: int = 0, sliding_window=None, block_q=BLOCK_Q, block_k=BLOCK_K
):
    """Blockwise causal attention with an O(T) backward; GQA by repeating the K/V heads."""
    return _by_heads(_flash, q, k, v, scale, q_offset, sliding_window, block_q, block_k)


def _by_heads(fn, q, k, v, scale, q_offset, window, block_q, block_k):
    """fn on [B * Hq, T, D] slices (K/V heads repeated for their query heads)."""
    b, tq, hq, d = q.shape
    group = hq // k.shape[2]
    if group > 1:  # autodiff of the repeat sums each K/V head's gradient over its group
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)

    def heads(x):
        return x.transpose(0, 2, 1, 3).reshape(b * hq, x.shape[1], d)

    out = fn(heads(q), heads(k), heads(v), scale, q_offset, window, block_q, block_k)
    return out.reshape(b, hq, tq, d).transpose(0, 2, 1, 3)


class Blocks:
    """The tiling of one call: which key blocks a query block needs and the other way around,
    and each block pair's mask. Positions past Tq / Tk are padding."""

    def __init__(self, tq, tk, q_offset, window, block_q, block_k):
        self.tq, self.tk, self.q_offset, self.window = tq, tk, q_offset, window
        self.bq, self.bk = block_q, block_k
        self.nq, self.nk = -(-tq // block_q), -(-tk // block_k)

    def pad(self, x, block):
        """x [BH, T, D] padded along T to whole blocks."""
        return jnp.pad(x, ((0, 0), (0, -x.shape[1] % block), (0, 0)))

    def key_range(self, i):
        """Key blocks [lo, hi) that query block i sees."""
        first_q = self.q_offset + i * self.bq
        hi = jnp.minimum(self.nk, (first_q + self.bq - 1) // self.bk + 1)
        lo = 0 if self.window is None else jnp.maximum(0, (first_q - self.window + 1) // self.bk)
        return lo, hi

    def query_range(self, j):
        """Query blocks [lo, hi) that see key block j."""
        lo = jnp.maximum(0, (j * self.bk - self.q_offset) // self.bq)
        if self.window is None:
            return lo, self.nq
        last_q = (j + 1) * self.bk - 1 + self.window - 1  # the last position that sees it
        return lo, jnp.minimum(self.nq, (last_q - self.q_offset) // self.bq + 1)

    def mask(self, i, j):
        """[bq, bk]: which keys of block j the queries of block i see."""
        q_pos = self.q_offset + i * self.bq + jnp.arange(self.bq)[:, None]
        k_pos = j * self.bk + jnp.arange(self.bk)[None, :]
        mask = (k_pos <= q_pos) & (k_pos < self.tk)
        if self.window is not None:
            mask &= q_pos - k_pos < self.window
        return mask


def _block(x, index, size):
    return lax.dynamic_slice_in_dim(x, index * size, size, axis=1)


def _forward(q, k, v, scale, tiles: Blocks):
    """(out [BH, Tq, D], lse [BH, Tq] float32; -inf where a row sees no key)."""
    q, k, v = tiles.pad(q, tiles.bq), tiles.pad(k, tiles.bk), tiles.pad(v, tiles.bk)
    bh, d = q.shape[0], q.shape[2]

    def query_block(i):
        qi = _block(q, i, tiles.bq).astype(jnp.float32) * scale

        def step(j, carry):
            acc, m, l = carry
            s = jnp.einsum("bqd,bkd->bqk", qi, _block(k, j, tiles.bk).astype(jnp.float32))
            s = jnp.where(tiles.mask(i, j), s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no key yet: nothing to rescale
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            pv = jnp.einsum("bqk,bkd->bqd", p, _block(v, j, tiles.bk).astype(jnp.float32))
            return acc * alpha[..., None] + pv, m_new, l * alpha + p.sum(-1)

        init = (
            jnp.zeros((bh, tiles.bq, d), jnp.float32),
            jnp.full((bh, tiles.bq), -jnp.inf, jnp.float32),
            jnp.zeros((bh, tiles.bq), jnp.float32),
        )
        acc, m, l = lax.fori_loop(*tiles.key_range(i), step, init)
        seen = l > 0
        out = acc / jnp.where(seen, l, 1.0)[..., None]
        return out, jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)

    out, lse = lax.map(query_block, jnp.arange(tiles.nq))  # [nq, BH, bq, (D)]
    out = out.transpose(1, 0, 2, 3).reshape(bh, -1, d)[:, : tiles.tq]
    return out.astype(q.dtype), lse.transpose(1, 0, 2).reshape(bh, -1)[:, : tiles.tq]


def _backward(q, k, v, out, lse, dout, scale, tiles: Blocks):
    """dq, dk, dv, recomputing each block pair's probabilities from the saved lse."""
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [BH, Tq]
    q, dout = tiles.pad(q, tiles.bq), tiles.pad(dout, tiles.bq)
    k, v = tiles.pad(k, tiles.bk), tiles.pad(v, tiles.bk)
    lse = jnp.pad(lse, ((0, 0), (0, q.shape[1] - lse.shape[1])), constant_values=-jnp.inf)
    delta = jnp.pad(delta, ((0, 0), (0, q.shape[1] - delta.shape[1])))
    f32 = jnp.float32

    def pair(i, j):
        """(q_i, do_i, k_j, v_j, P_ij, dS_ij) of query block i and key block j."""
        qi, doi = _block(q, i, tiles.bq).astype(f32), _block(dout, i, tiles.bq).astype(f32)
        kj, vj = _block(k, j, tiles.bk).astype(f32), _block(v, j, tiles.bk).astype(f32)
        lse_i = lax.dynamic_slice_in_dim(lse, i * tiles.bq, tiles.bq, axis=1)
        delta_i = lax.dynamic_slice_in_dim(delta, i * tiles.bq, tiles.bq, axis=1)
        s = jnp.einsum("bqd,bkd->bqk", qi, kj) * scale
        lse_safe = jnp.where(lse_i == -jnp.inf, 0.0, lse_i)
        p = jnp.where(tiles.mask(i, j), jnp.exp(s - lse_safe[..., None]), 0.0)
        dp = jnp.einsum("bqd,bkd->bqk", doi, vj)
        return qi, doi, kj, p, p * (dp - delta_i[..., None])

    def key_block(j):
        def step(i, carry):
            dk, dv = carry
            qi, doi, _, p, ds = pair(i, j)
            return dk + jnp.einsum("bqk,bqd->bkd", ds, qi), dv + jnp.einsum("bqk,bqd->bkd", p, doi)

        zero = jnp.zeros((q.shape[0], tiles.bk, q.shape[2]), f32)
        dk, dv = lax.fori_loop(*tiles.query_range(j), step, (zero, zero))
        return dk * scale, dv

    def query_block(i):
        def step(j, dq):
            _, _, kj, _, ds = pair(i, j)
            return dq + jnp.einsum("bqk,bkd->bqd", ds, kj)

        zero = jnp.zeros((q.shape[0], tiles.bq, q.shape[2]), f32)
        return lax.fori_loop(*tiles.key_range(i), step, zero) * scale

    dk, dv = lax.map(key_block, jnp.arange(tiles.nk))  # [nk, BH, bk, D]
    dq = lax.map(query_block, jnp.arange(tiles.nq))

    def unblock(x, t, like):
        return x.transpose(1, 0, 2, 3).reshape(like.shape[0], -1, like.shape[2])[:, :t]

    return (
        unblock(dq, tiles.tq, q).astype(q.dtype),
        unblock(dk, tiles.tk, k).astype(k.dtype),
        unblock(dv, tiles.tk, v).astype(v.dtype),
    )


def with_flash_backward(forward):
    """A custom-VJP attention fn(q, k, v, scale, q_offset, window, block_q, block_k) over
    [BH, T, D] slices: the forward is `forward(q, k, v, scale, tiles) -> (out, lse)`, the
    backward the blockwise recomputation above (what the Pallas kernel shares)."""

    def tiles_of(q, k, q_offset, window, block_q, block_k):
        return Blocks(q.shape[1], k.shape[1], q_offset, window, block_q, block_k)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
    def fn(q, k, v, scale, q_offset, window, block_q, block_k):
        return forward(q, k, v, scale, tiles_of(q, k, q_offset, window, block_q, block_k))[0]

    def fn_fwd(q, k, v, scale, q_offset, window, block_q, block_k):
        out, lse = forward(q, k, v, scale, tiles_of(q, k, q_offset, window, block_q, block_k))
        return out, (q, k, v, out, lse)

    def fn_bwd(scale, q_offset, window, block_q, block_k, res, dout):
        q, k, v, out, lse = res
        tiles = tiles_of(q, k, q_offset, window, block_q, block_k)
        return _backward(q, k, v, out, lse, dout, scale, tiles)

    fn.defvjp(fn_fwd, fn_bwd)
    return fn


_flash = with_flash_backward(_forward)
