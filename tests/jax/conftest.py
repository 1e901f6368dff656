"""kiln.jax tests: JAX models loaded once per session from the shared tiny checkpoints, so that
every test of a family reuses one set of jit compilations (keyed by the Model's config)."""

import pytest


@pytest.fixture(scope="session")
def jax_model(hf_model_dir):
    """jax_model(name) -> (kiln.jax Model in float32, its checkpoint directory)."""
    from kiln.jax import load_model

    cache = {}

    def get(name: str):
        if name not in cache:
            path, _ = hf_model_dir(name)
            cache[name] = (load_model(path, dtype="float32"), path)
        return cache[name]

    return get
