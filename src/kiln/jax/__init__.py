"""kiln in JAX (the `kiln[jax]` extra): the same decoder, loaded from the same checkpoints, in
jax.numpy and lax.

    model = kiln.jax.load_model("path/to/hf_dir")     # model(ids [B, T]) -> logits [B, T, vocab]
    out = kiln.jax.generate(model, ids, max_new_tokens=32)

Beside it: FlashAttention with an O(T) backward (flash.py) and as a Pallas kernel
(pallas_attention.py), int8 weights (quant.py), a paged KV cache and its batched decode loop
(paged.py).
"""

try:
    import jax  # noqa: F401
except ImportError as e:  # pragma: no cover - the extra is not installed
    raise ImportError("kiln.jax needs JAX: pip install 'kiln[jax]'") from e

from kiln.jax.generate import generate
from kiln.jax.loader import load_model
from kiln.jax.model import Model, forward

__all__ = ["Model", "forward", "generate", "load_model"]
