"""ONE decoder in pure JAX (jax.numpy and lax) for every attention family kiln serves: Llama,
Qwen2, Qwen3 (q/k norms), Mistral (sliding windows), Mixtral and Qwen3-MoE, GPT-2 (learned
positions, LayerNorm, GELU), tied embeddings. The math follows kiln.model step for step.

Params are a plain pytree; a Linear is {"w": [in, out], "b": [out]} (no "b": no bias), or once
quantized {"w": int8 [in, out], "scale": [out]} (kiln.jax.quant). A layer:

    {"input_norm": norm, "attn": {"q", "k", "v", "o": linear, "q_norm", "k_norm": [D]},
     "post_norm": norm, "mlp": {"gate", "up", "down": linear}            (dense; GPT-2: no gate)
                        or {"router": linear, "gate", "up", "down": stacked [E, in, out]}}
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from kiln.config import ModelConfig
from kiln.jax.attention import DenseCausal, causal_attention


def linear(p: dict, x: jax.Array, spec: str = "...i,io->...o") -> jax.Array:
    """x times p's weight (einsum `spec`), scaled per output channel when int8, plus bias."""
    y = jnp.einsum(spec, x, p["w"].astype(x.dtype))
    if "scale" in p:
        y = y * p["scale"].astype(x.dtype)
    if "b" in p:
        y = y + p["b"]
    return y


def norm(p: dict, x: jax.Array, config: ModelConfig) -> jax.Array:
    """RMSNorm (in float32, like kiln.model.layers.RMSNorm) or, for GPT-2, LayerNorm."""
    xf = x.astype(jnp.float32)
    if config.norm_type == "layernorm":
        xf = xf - xf.mean(-1, keepdims=True)
        xf = xf * jax.lax.rsqrt((xf * xf).mean(-1, keepdims=True) + config.norm_eps)
        return (xf * p["weight"] + p["bias"]).astype(x.dtype)
    return rms_norm(p["weight"], x, config.norm_eps)


def rms_norm(weight: jax.Array, x: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt((xf * xf).mean(-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def apply_rope(x: jax.Array, cos_sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE of x [B, T, H, D] with cos_sin [B, T, D] (cos halves, then sin)."""
    cos, sin = jnp.split(cos_sin[:, :, None], 2, axis=-1)  # [B, T, 1, D / 2]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def activation(name: str):
    if name == "silu":
        return jax.nn.silu
    return functools.partial(jax.nn.gelu, approximate=name == "gelu_new")


def attention(p, x, cos_sin, layer_idx: int, config: ModelConfig, backend) -> jax.Array:
    b, t, _ = x.shape
    d = config.head_dim
    q = linear(p["q"], x).reshape(b, t, config.num_heads, d)
    k = linear(p["k"], x).reshape(b, t, config.num_kv_heads, d)
    v = linear(p["v"], x).reshape(b, t, config.num_kv_heads, d)
    if config.qk_norm:
        q, k = rms_norm(p["q_norm"], q, config.norm_eps), rms_norm(p["k_norm"], k, config.norm_eps)
    if cos_sin is not None:
        q, k = apply_rope(q, cos_sin), apply_rope(k, cos_sin)
    window = config.sliding_windows[layer_idx]
    out = backend.attend(layer_idx, q, k, v, d**-0.5, window)  # every layer attends
    return linear(p["o"], out.reshape(b, t, config.num_heads * d))


def mlp(p, x, config: ModelConfig) -> jax.Array:
    if "router" in p:
        return moe(p, x, config)
    act = activation(config.activation)
    if config.gated_mlp:
        return linear(p["down"], act(linear(p["gate"], x)) * linear(p["up"], x))
    return linear(p["down"], act(linear(p["up"], x)))


def moe(p, x, config: ModelConfig) -> jax.Array:
    """Mixtral / Qwen3-MoE: softmax router in float32, top-k, weights renormalized over the k
    as the family says. Every expert runs on every token (one einsum over the stacked experts)
    and the unchosen ones are weighted 0: no gather, at E / k times the MLP FLOPs."""
    act = activation(config.activation)
    probs = jax.nn.softmax(linear(p["router"], x).astype(jnp.float32), axis=-1)  # [B, T, E]
    weights, chosen = jax.lax.top_k(probs, config.num_experts_per_tok)
    if config.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
    dense = jnp.sum(jax.nn.one_hot(chosen, probs.shape[-1]) * weights[..., None], axis=-2)
    h = act(linear(p["gate"], x, "bti,eio->bteo")) * linear(p["up"], x, "bti,eio->bteo")
    y = linear(p["down"], h, "btei,eio->bteo")  # [B, T, E, H]
    return jnp.einsum("bte,bteh->bth", dense.astype(x.dtype), y)


def hidden_states(params, rope, ids, positions, config: ModelConfig, backend) -> jax.Array:
    """Final-norm hidden states [B, T, H] for ids [B, T] at positions [B, T]."""
    x = params["embed"][ids]
    if config.position_embedding == "learned":
        x = x + params["pos_embed"][positions]
    cos_sin = None if rope is None else rope[positions]
    for i, layer in enumerate(params["layers"]):
        x = x + attention(
            layer["attn"], norm(layer["input_norm"], x, config), cos_sin, i, config, backend
        )
        x = x + mlp(layer["mlp"], norm(layer["post_norm"], x, config), config)
    return norm(params["norm"], x, config)


def compute_logits(params, hidden: jax.Array) -> jax.Array:
    """Logits [..., vocab]; tied embeddings when the params hold no lm_head."""
    if "lm_head" in params:
        return linear(params["lm_head"], hidden)
    return hidden @ params["embed"].T


def forward(model: Model, ids: jax.Array, positions=None, backend=None) -> jax.Array:
    """Logits [B, T, vocab] of ids [B, T] (traceable: the jitted paths all call this)."""
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    backend = backend or DenseCausal(model.attention_fn)
    h = hidden_states(model.params, model.rope, ids, positions, model.config, backend)
    return compute_logits(model.params, h)


class _ByIdentity:
    """A pytree's static field, compared and hashed by identity (ModelConfig is unhashable)."""

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return isinstance(other, _ByIdentity) and other.value is self.value

    def __hash__(self):
        return id(self.value)


def attention_functions() -> dict[str, Any]:
    """attention name -> fn(q, k, v, scale, q_offset, sliding_window): the prefill/training
    attention a Model uses ("naive" is the reference). Imported here: Pallas loads on use."""
    from kiln.jax.flash import flash_attention
    from kiln.jax.pallas_attention import pallas_attention

    return {"naive": causal_attention, "flash": flash_attention, "pallas": pallas_attention}


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True, eq=False)
class Model:
    """A loaded decoder: model(ids [B, T]) -> logits [B, T, vocab]. A pytree (params and the
    RoPE table are its leaves), so jitted functions take it as an argument; the config and
    the attention switch are static."""

    config: ModelConfig
    params: dict
    rope: jax.Array | None  # [max_positions, head_dim] float32 cos/sin table (None: no RoPE)
    attention: str = "naive"  # "naive" | "flash" | "pallas": prefill and training attention

    def __post_init__(self):
        assert self.attention in ("naive", "flash", "pallas"), self.attention

    @property
    def attention_fn(self):
        return attention_functions()[self.attention]

    @property
    def dtype(self):
        return self.params["embed"].dtype

    def replace(self, **changes) -> Model:
        """A copy with some fields changed (`model.replace(attention="flash")`)."""
        return dataclasses.replace(self, **changes)

    def __call__(self, ids) -> jax.Array:
        return _logits(self, jnp.asarray(ids, dtype=jnp.int32))

    def tree_flatten(self):
        return (self.params, self.rope), (_ByIdentity(self.config), self.attention)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(aux[0].value, children[0], children[1], aux[1])


@jax.jit
def _logits(model: Model, ids: jax.Array) -> jax.Array:
    return forward(model, ids)
