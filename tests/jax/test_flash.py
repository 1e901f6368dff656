"""FlashAttention in JAX (and its Pallas kernel) against the plain masked softmax: outputs and
gradients, and the backward's memory growing linearly."""

import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402

from kiln.jax.attention import causal_attention  # noqa: E402
from kiln.jax.flash import flash_attention  # noqa: E402
from kiln.jax.pallas_attention import pallas_attention  # noqa: E402

# (batch, Tq, Tk, Hq, Hkv, D, q_offset, sliding_window): ragged tails of 16-wide blocks, GQA and
# MQA, queries that are the last Tq of Tk positions, windows shorter than the sequence.
CASES = [
    (2, 37, 37, 4, 2, 16, 0, None),
    (1, 37, 37, 4, 1, 16, 0, 8),
    (1, 20, 45, 2, 2, 32, 25, 7),
]


def _inputs(b, tq, tk, hq, hkv, d, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (b, tq, hq, d))
    k = jax.random.normal(keys[1], (b, tk, hkv, d))
    v = jax.random.normal(keys[2], (b, tk, hkv, d))
    return q, k, v, jax.random.normal(keys[3], (b, tq, hq, d))


def _value_and_grads(fn, q, k, v, dout):
    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out * dout), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)


def _check(attention_fn, case):
    b, tq, tk, hq, hkv, d, offset, window = case
    q, k, v, dout = _inputs(b, tq, tk, hq, hkv, d)
    scale = d**-0.5
    (_, ref), ref_grads = _value_and_grads(
        lambda q, k, v: causal_attention(q, k, v, scale, offset, window), q, k, v, dout
    )
    (_, out), grads = _value_and_grads(
        lambda q, k, v: attention_fn(q, k, v, scale, offset, window, 16, 16), q, k, v, dout
    )
    assert jnp.abs(out - ref).max() < 1e-5
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape
        assert jnp.abs(got - want).max() < 1e-5


@pytest.mark.parametrize("case", CASES, ids=str)
def test_flash_output_and_gradients_match_naive(case):
    _check(flash_attention, case)


@pytest.mark.parametrize("case", [CASES[2]], ids=str)
def test_pallas_kernel_in_interpret_mode_matches_naive(case):
    _check(pallas_attention, case)


def test_flash_backward_memory_grows_linearly():
    """The compiled gradient's scratch memory: naive holds [T, T] scores, flash only blocks."""

    def temp_bytes(fn, t):
        x = jax.ShapeDtypeStruct((1, t, 1, 16), jnp.float32)

        def loss(q, k, v):
            return fn(q, k, v, 0.25, 0, None).sum()

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return grad.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes

    naive = [temp_bytes(causal_attention, t) for t in (512, 1024)]
    flash = [temp_bytes(flash_attention, t) for t in (512, 1024)]
    assert naive[1] > 3.5 * naive[0]  # quadratic
    assert flash[1] < 2.5 * flash[0]  # linear
    assert flash[1] < naive[1] / 8
