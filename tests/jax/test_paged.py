"""The paged KV cache in JAX: its attention against kiln's torch reference over the same pool
layout, and the batched paged decode loop against the dense-cache generate."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

import kiln.jax  # noqa: E402
from kiln.errors import InputError  # noqa: E402
from kiln.jax.paged import paged_decode_attention, paged_generate  # noqa: E402
from kiln.kernels.common import PagedKV  # noqa: E402
from kiln.kernels.paged_decode_attention import paged_decode_attention_ref  # noqa: E402


@pytest.mark.parametrize("window", [None, 6])
def test_paged_attention_matches_the_torch_reference(window):
    """Same pool, scattered blocks, GQA: the block-table gather reads what kiln's engine wrote."""
    g = torch.Generator().manual_seed(0)
    lens, block_size, hkv, hq, d = [1, 9, 22], 4, 2, 4, 16
    num_blocks = 20
    k_pool = torch.randn(num_blocks, block_size, hkv, d, generator=g)
    v_pool = torch.randn(num_blocks, block_size, hkv, d, generator=g)
    tables = torch.randperm(num_blocks, generator=g)[:18].reshape(3, 6).int()
    q = torch.randn(3, hq, d, generator=g)
    context = torch.tensor(lens, dtype=torch.int32)
    ref = paged_decode_attention_ref(q, PagedKV(k_pool, v_pool, tables, context), 0.25, window)
    out = paged_decode_attention(
        *(jnp.asarray(t.numpy()) for t in (q, k_pool, v_pool, tables, context)), 0.25, window
    )
    assert np.abs(np.asarray(out) - ref.numpy()).max() < 1e-5


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_paged_decode_gives_the_dense_tokens(jax_model, name):
    """Prompts of two lengths decode as one batch over 4-token blocks (mistral's window 8
    is shorter than every context by the end)."""
    model, _ = jax_model(name)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 256, n).tolist() for n in (5, 13)]
    paged = paged_generate(model, prompts, max_new_tokens=10, block_size=4)
    dense = [np.asarray(kiln.jax.generate(model, [p], 10))[0].tolist() for p in prompts]
    assert paged == dense


def test_paged_pool_too_small_raises(jax_model):
    model, _ = jax_model("llama")
    with pytest.raises(InputError, match="out of blocks"):
        paged_generate(model, [[3, 4, 5, 6, 7]], max_new_tokens=8, block_size=4, num_blocks=2)
