"""Load a Hugging Face checkpoint (safetensors only, read by safetensors' numpy loader) into the
JAX decoder's params, through kiln's own name mapping (kiln.model.hf_format)."""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from kiln.config import ModelConfig
from kiln.errors import CheckpointError, ConfigError
from kiln.jax.model import Model
from kiln.model.hf_format import KV_SCALE_NAMES, hf_to_kiln, weight_files
from kiln.model.layers import RotaryEmbedding

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def load_model(path: str | os.PathLike, dtype: str = "float32") -> Model:
    """Load a model directory (config.json + safetensors) as a JAX Model; ConfigError for
    what kiln.jax does not run (SSM layers, checkpoints stored quantized)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {str(path)!r} does not exist")
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    config = ModelConfig.from_dir(path)
    check_supported(config)
    tensors = read_checkpoint(path, config)
    params = build_params(config, _Tensors(tensors, DTYPES[dtype]))
    rope = None
    if config.position_embedding == "rope":  # kiln's own table: every rope scaling, as torch
        rope = jnp.asarray(RotaryEmbedding(config).cos_sin.numpy())
    return Model(config, params, rope)


def check_supported(config: ModelConfig) -> None:
    if config.num_ssm_layers:
        raise ConfigError(
            f"kiln.jax runs attention layers only; this {config.model_type} model has "
            f"{config.num_ssm_layers} SSM (Mamba) layer(s)"
        )
    method = (config.hf_config.get("quantization_config") or {}).get("quant_method")
    if method:
        raise ConfigError(
            f"kiln.jax loads float checkpoints; this one is quantized ({method}): load the "
            "float model and apply kiln.jax.quant.quantize_int8"
        )


def read_checkpoint(path: Path, config: ModelConfig) -> dict[str, np.ndarray]:
    """kiln name -> array of every tensor in the checkpoint's safetensors files."""
    out = {}
    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="numpy") as f:
                for hf_name in f.keys():
                    array = f.get_tensor(hf_name)
                    if array.dtype not in (np.float32, np.float16):  # bfloat16: exact in fp32
                        array = array.astype(np.float32)
                    for name, t in hf_to_kiln(config, hf_name, torch.from_numpy(array)):
                        out[name] = t.numpy()
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: not a valid safetensors file ({e})") from e
    return out


class _Tensors:
    """The checkpoint's tensors, taken one by one with their expected shape checked."""

    def __init__(self, tensors: dict[str, np.ndarray], dtype):
        self.tensors, self.dtype = tensors, dtype

    def take(self, name: str, shape: tuple[int, ...]):
        if name not in self.tensors:
            raise CheckpointError(f"checkpoint lacks tensor {name!r}")
        t = self.tensors.pop(name)
        if t.shape != shape:
            raise CheckpointError(f"tensor {name!r} has shape {t.shape}, config expects {shape}")
        return jnp.asarray(t, dtype=self.dtype)

    def linear(self, prefix: str, n_in: int, n_out: int, bias: bool) -> dict:
        """{"w": [in, out], "b": [out]} from a torch-layout [out, in] Linear."""
        p = {"w": self.take(f"{prefix}.weight", (n_out, n_in)).T}
        if bias:
            p["b"] = self.take(f"{prefix}.bias", (n_out,))
        return p

    def stacked(self, prefixes: list[str], n_in: int, n_out: int, bias: bool) -> dict:
        """The experts' Linears stacked: {"w": [E, in, out], "b": [E, out]}."""
        parts = [self.linear(p, n_in, n_out, bias) for p in prefixes]
        return {k: jnp.stack([p[k] for p in parts]) for k in parts[0]}

    def norm(self, prefix: str, dim: int, layernorm: bool) -> dict:
        p = {"weight": self.take(f"{prefix}.weight", (dim,))}
        if layernorm:
            p["bias"] = self.take(f"{prefix}.bias", (dim,))
        return p

    def check_all_taken(self) -> None:
        left = [n for n in self.tensors if not n.endswith(("rotary_emb.inv_freq", *KV_SCALE_NAMES))]
        if left:
            raise CheckpointError(f"unexpected tensor {sorted(left)[0]!r} for this config")


def build_params(config: ModelConfig, t: _Tensors) -> dict:
    c, ln = config, config.norm_type == "layernorm"
    h = c.hidden_size
    params = {"embed": t.take("embed_tokens.weight", (c.vocab_size, h))}
    if c.position_embedding == "learned":
        params["pos_embed"] = t.take("embed_positions.weight", (c.max_position_embeddings, h))
    params["layers"] = [_layer(c, t, i) for i in range(c.num_layers)]
    params["norm"] = t.norm("norm", h, ln)
    if c.tie_word_embeddings:
        t.tensors.pop("lm_head.weight", None)  # the embedding's copy, when a checkpoint has it
    else:
        params["lm_head"] = t.linear("lm_head", h, c.vocab_size, bias=False)
    t.check_all_taken()
    return params


def _layer(c: ModelConfig, t: _Tensors, i: int) -> dict:
    pre, ln = f"layers.{i}", c.norm_type == "layernorm"
    h, q_dim, kv_dim = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    a = f"{pre}.self_attn"
    attn = {
        "q": t.linear(f"{a}.q_proj", h, q_dim, c.qkv_bias),
        "k": t.linear(f"{a}.k_proj", h, kv_dim, c.qkv_bias),
        "v": t.linear(f"{a}.v_proj", h, kv_dim, c.qkv_bias),
        "o": t.linear(f"{a}.o_proj", q_dim, h, c.o_bias),
    }
    if c.qk_norm:
        attn["q_norm"] = t.take(f"{a}.q_norm.weight", (c.head_dim,))
        attn["k_norm"] = t.take(f"{a}.k_norm.weight", (c.head_dim,))
    m = f"{pre}.mlp"
    if c.is_moe_layer(i):
        inter = c.moe_intermediate_size or c.intermediate_size
        experts = [f"{m}.experts.{e}" for e in range(c.num_experts)]
        mlp = {"router": t.linear(f"{m}.gate", h, c.num_experts, bias=False)}
        for proj, n_in, n_out in (("gate", h, inter), ("up", h, inter), ("down", inter, h)):
            mlp[proj] = t.stacked([f"{e}.{proj}_proj" for e in experts], n_in, n_out, c.mlp_bias)
    else:
        i_size = c.intermediate_size
        mlp = {
            "up": t.linear(f"{m}.up_proj", h, i_size, c.mlp_bias),
            "down": t.linear(f"{m}.down_proj", i_size, h, c.mlp_bias),
        }
        if c.gated_mlp:
            mlp["gate"] = t.linear(f"{m}.gate_proj", h, i_size, c.mlp_bias)
    return {
        "input_norm": t.norm(f"{pre}.input_layernorm", h, ln),
        "attn": attn,
        "post_norm": t.norm(f"{pre}.post_attention_layernorm", h, ln),
        "mlp": mlp,
    }
