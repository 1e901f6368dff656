"""INT8 weights in JAX: calibrated per-channel scales, and a quantized model close to float."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402

from kiln.jax.quant import absmax_scale, calibrate_scale, fake_quantize, quantize_int8  # noqa: E402


def test_calibrated_scales_beat_absmax():
    """Wide heavy-tailed channels: clipping the outliers lowers the rounding error."""
    w = jax.random.t(jax.random.PRNGKey(0), 3.0, (4096, 32))  # [in, out]
    calibrated, plain = calibrate_scale(w), absmax_scale(w)

    def err(scale):
        return jnp.sum(jnp.square(fake_quantize(w, scale) - w), axis=0)

    assert calibrated.shape == (32,)
    assert bool(jnp.all(err(calibrated) <= err(plain)))
    assert float(err(calibrated).sum()) < 0.99 * float(err(plain).sum())
    assert bool(jnp.all(calibrated <= plain))  # a clip, never a stretch


def test_all_zero_channel_keeps_a_usable_scale():
    w = jnp.zeros((8, 4)).at[:, 1].set(1.0)
    scale = calibrate_scale(w)
    assert bool(jnp.all(jnp.isfinite(scale))) and float(fake_quantize(w, scale)[0, 1]) == 1.0


@pytest.mark.parametrize("name", ["llama", "mixtral", "gpt2"])
def test_int8_model_stays_close_to_float(jax_model, name):
    model, _ = jax_model(name)
    quantized = quantize_int8(model)
    layer = quantized.params["layers"][0]
    assert layer["attn"]["q"]["w"].dtype == jnp.int8
    assert layer["mlp"]["down"]["w"].dtype == jnp.int8  # MoE: every expert's, stacked
    assert layer["mlp"]["down"]["scale"].shape == layer["mlp"]["down"]["w"].shape[:-2] + (64,)
    assert quantized.params["embed"].dtype == jnp.float32
    ids = np.random.default_rng(0).integers(3, 256, (2, 20))
    ref, out = np.asarray(model(ids)), np.asarray(quantized(ids))
    assert np.abs(out - ref).max() < 0.03 * np.abs(ref).max()
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
