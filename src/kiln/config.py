"""ModelConfig: one dataclass for every family, parsed from a Hugging Face config.json."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError

SUPPORTED_MODEL_TYPES = (
    "llama",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "mistral",
    "mixtral",
    "gpt2",
    "mamba",
    "mamba2",
)
SSM_LAYER_TYPES = ("mamba", "mamba2")  # layer_types entries that make a layer an SSM block
ATTENTION_LAYER_TYPES = ("attention", "full_attention", "sliding_attention")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


ALL_LINEAR = "all-linear"


@dataclass
class LoraConfig:
    """PEFT's field names: rank r, lora_alpha (scaling = alpha / r), target modules by name.

    Torch-free so that the fine-tuning CLIs declare their LoRA flags from it (`--lora-r` ...)
    without importing the model; kiln.model.lora applies it.
    """

    r: int = field(default=8, metadata={"flag": "lora-r", "help": "LoRA rank"})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (None: 2 * r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    target_modules: str | list[str] = field(
        default=ALL_LINEAR,
        metadata={"help": "comma-separated module names (q_proj,v_proj,...) or 'all-linear'"},
    )

    def __post_init__(self):
        if self.r < 1:
            raise ConfigError(f"LoRA rank r must be >= 1, got {self.r}")
        if self.lora_alpha is None:
            self.lora_alpha = 2.0 * self.r
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
            self.target_modules = [t.strip() for t in self.target_modules.split(",") if t.strip()]


@dataclass
class SSMConfig:
    """The Mamba mixer of a model's SSM layers (kiln.model.ssm); Mamba-1 and Mamba-2 fields."""

    state_size: int = 16  # N: the state per channel
    conv_kernel: int = 4
    intermediate_size: int = 128  # D = expand * hidden_size
    time_step_rank: int = 4  # Mamba-1: the dt low-rank projection
    num_heads: int = 8  # Mamba-2: D = num_heads * head_dim; A, dt, D per head
    head_dim: int = 16
    n_groups: int = 1  # Mamba-2: B and C shared by num_heads / n_groups heads
    chunk_size: int = 256
    conv_bias: bool = True
    proj_bias: bool = False  # in_proj / out_proj biases
    time_step_limit: tuple[float, float] = (0.0, math.inf)


@dataclass
class ModelConfig:
    """Architecture of a decoder-only Transformer; family quirks are plain fields."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-6
    norm_type: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    activation: str = "silu"  # "silu" | "gelu_new" | "gelu"
    gated_mlp: bool = True  # SwiGLU (gate/up/down) vs GPT-2's fc/proj
    position_embedding: str = "rope"  # "rope" | "learned" | "none" (Mamba)
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3"|"linear", ...}
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k
    # Per-layer sliding window (None = full attention); keys with q_pos - k_pos < window.
    sliding_windows: list[int | None] = field(default_factory=list)
    # Per-layer mixer: "attention" or an SSM ("mamba", "mamba2"; kiln.model.ssm), so a hybrid
    # is one config change. Empty: every layer attends.
    layer_types: list[str] = field(default_factory=list)
    ssm: SSMConfig | None = None  # the SSM layers' mixer (None: no SSM layer)
    num_experts: int = 0  # Mixtral / Qwen3-MoE: experts per MoE layer (0 = dense MLP)
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None  # each expert's (None: intermediate_size)
    norm_topk_prob: bool = True  # renormalize the top-k router weights to sum to 1
    # Layers with a dense MLP although num_experts > 0 (Qwen3-MoE's mlp_only_layers and
    # decoder_sparse_step); their MLP is intermediate_size wide.
    dense_mlp_layers: list[int] = field(default_factory=list)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    dtype: str | None = None  # the checkpoint's dtype, e.g. "bfloat16"
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.sliding_windows:
            self.sliding_windows = [None] * self.num_layers
        assert len(self.sliding_windows) == self.num_layers
        if not self.layer_types or (
            len(self.layer_types) != self.num_layers
            and not any(t in SSM_LAYER_TYPES for t in self.layer_types)
        ):  # (a copy with fewer layers, e.g. a draft's, keeps every layer attending)
            self.layer_types = ["attention"] * self.num_layers
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(
                f"layer_types must list one type for each of the {self.num_layers} layers"
            )
        bad = set(self.layer_types) - set(SSM_LAYER_TYPES) - set(ATTENTION_LAYER_TYPES)
        if bad:
            raise ConfigError(
                f"unsupported layer type {sorted(bad)[0]!r}; supported: "
                + ", ".join(ATTENTION_LAYER_TYPES + SSM_LAYER_TYPES)
            )
        if self.ssm is None and any(t in SSM_LAYER_TYPES for t in self.layer_types):
            raise ConfigError("layer_types names an SSM layer but the config has no SSM fields")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    def is_moe_layer(self, layer_idx: int) -> bool:
        return bool(self.num_experts) and layer_idx not in self.dense_mlp_layers

    def is_ssm_layer(self, layer_idx: int) -> bool:
        return self.layer_types[layer_idx] in SSM_LAYER_TYPES

    @property
    def kv_layers(self) -> list[int]:
        """The attention layers, in order: layer kv_layers[j] keeps its K/V at cache index j."""
        return [i for i in range(self.num_layers) if not self.is_ssm_layer(i)]

    @property
    def num_kv_layers(self) -> int:
        return len(self.kv_layers)

    @property
    def num_ssm_layers(self) -> int:
        return self.num_layers - self.num_kv_layers

    @property
    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        attn = h * (q + 2 * kv) + q * h
        per = 3 if self.gated_mlp else 2
        layer_mlp = []
        for layer in range(self.num_layers):
            if not self.intermediate_size:  # Mamba's own models: the mixer alone
                layer_mlp.append(0)
            elif self.is_moe_layer(layer):
                expert = per * h * (self.moe_intermediate_size or i)
                layer_mlp.append(self.num_experts * expert + h * self.num_experts)
            else:
                layer_mlp.append(per * h * i)
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        if self.position_embedding == "learned":
            emb += self.max_position_embeddings * h
        total = emb + h
        for layer in range(self.num_layers):
            mixer = _ssm_params(self, self.layer_types[layer]) if self.is_ssm_layer(layer) else attn
            total += mixer + layer_mlp[layer] + 2 * h
        return total

    # ------------------------------------------------------------------ HF <-> kiln

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Map a Hugging Face config dict onto ModelConfig."""
        if not isinstance(hf, dict):
            raise ConfigError(f"expected a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {model_type!r}; supported: "
                + ", ".join(SUPPORTED_MODEL_TYPES)
            )
        if model_type == "gpt2":
            return cls._from_gpt2(hf)
        if model_type in SSM_LAYER_TYPES:
            return cls._from_mamba(hf)
        return cls._from_llama_like(hf)

    @classmethod
    def _from_llama_like(cls, hf: dict[str, Any]) -> ModelConfig:
        mt = hf["model_type"]
        hidden = _int(hf, "hidden_size")
        heads = _int(hf, "num_attention_heads")
        layers = _int(hf, "num_hidden_layers")
        moe = _moe_params(hf, layers) if mt in ("mixtral", "qwen3_moe") else {}
        theta, scaling = _rope_params(hf)
        context = _int(hf, "max_position_embeddings", 2048)
        if scaling and scaling["rope_type"] == "yarn":
            scaling.setdefault("original_max_position_embeddings", context)
        if scaling and scaling["rope_type"] == "dynamic":  # kiln's context: factor times
            scaling["original_max_position_embeddings"] = context
            context = int(context * scaling["factor"])
        return cls(
            model_type=mt,
            vocab_size=_int(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int(hf, "intermediate_size"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=_int(hf, "num_key_value_heads", heads),
            head_dim=_int(hf, "head_dim", hidden // heads),
            max_position_embeddings=context,
            norm_eps=_positive(hf, "rms_norm_eps", 1e-6),
            activation=_activation(hf.get("hidden_act", "silu")),
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=mt == "qwen2" or bool(hf.get("attention_bias", False)),
            o_bias=mt in ("llama", "qwen3", "qwen3_moe") and bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=mt in ("qwen3", "qwen3_moe"),
            sliding_windows=_sliding_windows(hf, layers),
            layer_types=_layer_types(hf, layers),
            ssm=_hybrid_ssm(hf, hidden),
            **moe,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            **_token_ids(hf),
            dtype=_dtype(hf),
            hf_config=dict(hf),
        )

    @classmethod
    def _from_gpt2(cls, hf: dict[str, Any]) -> ModelConfig:
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(flag):
                raise ConfigError(f"gpt2 option {flag}=true is not supported")
        if hf.get("scale_attn_weights") is False:
            raise ConfigError("gpt2 option scale_attn_weights=false is not supported")
        hidden, heads = _int(hf, "n_embd"), _int(hf, "n_head")
        if hidden % heads:
            raise ConfigError(f"n_embd={hidden} is not a multiple of n_head={heads}")
        return cls(
            model_type="gpt2",
            vocab_size=_int(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int(hf, "n_inner", 4 * hidden),
            num_layers=_int(hf, "n_layer"),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            max_position_embeddings=_int(hf, "n_positions", 1024),
            norm_eps=_positive(hf, "layer_norm_epsilon", 1e-5),
            norm_type="layernorm",
            activation=_activation(hf.get("activation_function", "gelu_new")),
            gated_mlp=False,
            position_embedding="learned",
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            **_token_ids(hf),
            dtype=_dtype(hf),
            hf_config=dict(hf),
        )

    @classmethod
    def _from_mamba(cls, hf: dict[str, Any]) -> ModelConfig:
        """Mamba / Mamba2: every layer x + mixer(norm(x)), no MLP, no positions."""
        mt = hf["model_type"]
        hidden, layers = _int(hf, "hidden_size"), _int(hf, "num_hidden_layers")
        ssm = _ssm_config(hf, hidden, "")
        if hf.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ConfigError(f"{mt}: hidden_act must be silu, got {hf.get('hidden_act')!r}")
        return cls(
            model_type=mt,
            vocab_size=_int(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=0,
            num_layers=layers,
            num_heads=1,
            num_kv_heads=1,
            head_dim=hidden,
            max_position_embeddings=_int(hf, "max_position_embeddings", 8192),
            norm_eps=_positive(hf, "layer_norm_epsilon", 1e-5),
            position_embedding="none",
            layer_types=[mt] * layers,
            ssm=ssm,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", mt == "mamba")),
            **_token_ids(hf),
            dtype=_dtype(hf),
            hf_config=dict(hf),
        )

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that `transformers` loads as the same architecture."""
        out = dict(self.hf_config)  # keep fields kiln does not model (rope extras, etc.)
        out.pop("quantization_config", None)  # kiln holds (and saves) dequantized weights
        common = {
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.pad_token_id is not None:
            common["pad_token_id"] = self.pad_token_id
        if self.dtype:
            common["dtype"] = self.dtype
        if self.model_type in SSM_LAYER_TYPES:
            out.update(
                common,
                architectures=[
                    "MambaForCausalLM" if self.model_type == "mamba" else "Mamba2ForCausalLM"
                ],
                hidden_size=self.hidden_size,
                num_hidden_layers=self.num_layers,
                layer_norm_epsilon=self.norm_eps,
            )
            return out
        if self.model_type == "gpt2":
            out.update(
                common,
                architectures=["GPT2LMHeadModel"],
                n_embd=self.hidden_size,
                n_layer=self.num_layers,
                n_head=self.num_heads,
                n_inner=self.intermediate_size,
                n_positions=self.max_position_embeddings,
                layer_norm_epsilon=self.norm_eps,
                activation_function=self.activation,
            )
            return out
        arch = {
            "llama": "LlamaForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
            "qwen3_moe": "Qwen3MoeForCausalLM",
            "mistral": "MistralForCausalLM",
            "mixtral": "MixtralForCausalLM",
        }[self.model_type]
        out.update(
            common,
            architectures=[arch],
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.norm_eps,
            hidden_act=self.activation,
        )
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope.update(self.rope_scaling)
        if rope["rope_type"] == "dynamic":  # back to the original context
            out["max_position_embeddings"] = rope.pop("original_max_position_embeddings")
        out.pop("rope_scaling", None)
        out["rope_parameters"] = rope
        out["rope_theta"] = self.rope_theta
        if self.model_type == "llama":
            out["attention_bias"] = self.qkv_bias
            out["mlp_bias"] = self.mlp_bias
        if self.model_type == "mixtral":
            out["num_local_experts"] = self.num_experts
            out["num_experts_per_tok"] = self.num_experts_per_tok
        if self.model_type == "qwen3_moe":
            out.pop("num_local_experts", None)
            out["num_experts"] = self.num_experts
            out["num_experts_per_tok"] = self.num_experts_per_tok
            out["moe_intermediate_size"] = self.moe_intermediate_size or self.intermediate_size
            out["norm_topk_prob"] = self.norm_topk_prob
            out["mlp_only_layers"] = list(self.dense_mlp_layers)
            out["decoder_sparse_step"] = 1
        if self.ssm is not None:  # a hybrid: its layer types and its mixer's fields
            s = self.ssm
            out["layer_types"] = list(self.layer_types)
            out.update(
                mamba_state_size=s.state_size,
                mamba_conv_kernel=s.conv_kernel,
                mamba_expand=s.intermediate_size // self.hidden_size,
                mamba_time_step_rank=s.time_step_rank,
                mamba_num_heads=s.num_heads,
                mamba_head_dim=s.head_dim,
                mamba_n_groups=s.n_groups,
                mamba_chunk_size=s.chunk_size,
                mamba_use_conv_bias=s.conv_bias,
                mamba_use_bias=s.proj_bias,
                mamba_time_step_limit=list(s.time_step_limit),
            )
        return out

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` from a model directory."""
        p = Path(path) / "config.json"
        if not p.is_file():
            raise ConfigError(f"no config.json in {str(path)!r}")
        try:
            hf = json.loads(p.read_text())
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise ConfigError(f"{p}: not valid JSON ({e})") from e
        try:
            return cls.from_hf(hf)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from e

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


_REQUIRED: Any = object()


def _int(hf: dict[str, Any], key: str, default: Any = _REQUIRED, minimum: int = 1) -> Any:
    """hf[key] (or `default` when absent or null) as an integer >= minimum, or None."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"lacks required field {key!r}")
        if default is None:
            return None
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _positive(hf: dict[str, Any], key: str, default: float) -> float:
    """hf[key] (or `default` when absent) as a finite number > 0."""
    value = hf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(f"{key} must be a number > 0, got {value!r}")
    return float(value)


def _token_ids(hf: dict[str, Any]) -> dict[str, Any]:
    """bos/eos/pad token ids: each null, an integer (old Llama configs say pad -1) or, for eos,
    a list of integers."""
    out = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = hf.get(key)
        ids = value if key == "eos_token_id" and isinstance(value, list) else [value]
        if value is not None and not all(type(i) is int for i in ids):
            raise ConfigError(f"{key} must be a token id (an integer), got {value!r}")
        out[key] = value
    return out


def _dtype(hf: dict[str, Any]) -> str | None:
    dtype = hf.get("dtype") or hf.get("torch_dtype")
    if dtype is not None and not isinstance(dtype, str):
        raise ConfigError(f"dtype must be a string such as 'bfloat16', got {dtype!r}")
    return dtype


def _activation(name: Any) -> str:
    aliases = {"silu": "silu", "swish": "silu", "gelu_new": "gelu_new", "gelu": "gelu"}
    aliases |= {"gelu_pytorch_tanh": "gelu_new", "gelu_fast": "gelu_new"}
    if not isinstance(name, str) or name not in aliases:
        raise ConfigError(f"unsupported activation {name!r}; supported: {sorted(aliases)}")
    return aliases[name]


def _rope_params(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and scaling from either the v4 (`rope_scaling`) or v5 (`rope_parameters`) keys."""
    params = hf.get("rope_parameters") or {}
    legacy = hf.get("rope_scaling") or {}
    for key, value in (("rope_parameters", params), ("rope_scaling", legacy)):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be an object, got {value!r}")
    theta = _positive(params, "rope_theta", _positive(hf, "rope_theta", 10000.0))
    scaling = {k: v for k, v in {**legacy, **params}.items() if k != "rope_theta"}
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None
    _positive(scaling, "factor", None)
    if rope_type == "llama3":
        _int(scaling, "original_max_position_embeddings")
    if rope_type == "yarn":
        _int(scaling, "original_max_position_embeddings", None)
        for key in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            if scaling.get(key) is not None:
                _positive(scaling, key, None)
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("partial_rotary_factor != 1 is not supported")
    return theta, {"rope_type": rope_type, **scaling}


def _moe_params(hf: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Mixtral's and Qwen3-MoE's expert fields as ModelConfig keyword arguments."""
    if hf["model_type"] == "mixtral":
        key = "num_local_experts"
        out = {"num_experts": _int(hf, key, 0, minimum=0), "norm_topk_prob": True}
    else:  # qwen3_moe (transformers' config saves num_experts as num_local_experts)
        key = "num_experts" if hf.get("num_experts") is not None else "num_local_experts"
        step = _int(hf, "decoder_sparse_step", 1)
        only = hf.get("mlp_only_layers") or []
        if not isinstance(only, list) or not all(type(i) is int for i in only):
            raise ConfigError(f"mlp_only_layers must be a list of layer indices, got {only!r}")
        dense = [i for i in range(num_layers) if i in only or (i + 1) % step]
        norm = hf.get("norm_topk_prob", False)
        if not isinstance(norm, bool):
            raise ConfigError(f"norm_topk_prob must be true or false, got {norm!r}")
        out = {
            "num_experts": _int(hf, key, 0, minimum=0),
            "moe_intermediate_size": _int(hf, "moe_intermediate_size"),
            "norm_topk_prob": norm,
            "dense_mlp_layers": dense,
        }
    top_k = out["num_experts_per_tok"] = _int(hf, "num_experts_per_tok", 2)
    if out["num_experts"] and top_k > out["num_experts"]:
        raise ConfigError(f"num_experts_per_tok={top_k} exceeds {key}={out['num_experts']}")
    return out


def _sliding_windows(hf: dict[str, Any], num_layers: int) -> list[int | None]:
    window = _int(hf, "sliding_window", None)
    qwen = hf["model_type"] in ("qwen2", "qwen3", "qwen3_moe")
    if qwen and not hf.get("use_sliding_window", False):
        window = None
    layer_types = hf.get("layer_types")
    if layer_types is not None and (
        not isinstance(layer_types, list) or len(layer_types) != num_layers
    ):
        raise ConfigError(f"layer_types must list one type for each of the {num_layers} layers")
    if layer_types and window:
        return [window if t == "sliding_attention" else None for t in layer_types]
    if qwen and window:
        first_full = _int(hf, "max_window_layers", num_layers, minimum=0)
        return [window if i >= first_full else None for i in range(num_layers)]
    return [window] * num_layers


def _ssm_config(hf: dict[str, Any], hidden: int, prefix: str) -> SSMConfig:
    """SSMConfig from Mamba's / Mamba2's keys; a hybrid names them with `prefix` ("mamba_")."""

    def key(name: str) -> str:
        return prefix + name

    expand = _int(hf, key("expand"), 2)
    inner = expand * hidden
    rank = hf.get(key("time_step_rank"), "auto")
    rank = math.ceil(hidden / 16) if rank == "auto" else _int(hf, key("time_step_rank"))
    head_dim = _int(hf, key("head_dim"), 64 if hf.get("model_type") == "mamba2" else inner)
    num_heads = _int(hf, key("num_heads"), inner // head_dim)
    n_groups = _int(hf, key("n_groups"), 1)
    if hf.get("model_type") == "mamba2" or prefix:
        if num_heads * head_dim != inner:
            raise ConfigError(
                f"{key('num_heads')}={num_heads} x {key('head_dim')}={head_dim} must equal "
                f"{key('expand')} x hidden_size = {inner}"
            )
        if num_heads % n_groups:
            raise ConfigError(
                f"{key('num_heads')}={num_heads} is not a multiple of {key('n_groups')}={n_groups}"
            )
    limit = hf.get(key("time_step_limit"), (0.0, math.inf))
    if not isinstance(limit, (list, tuple)) or len(limit) != 2:
        raise ConfigError(f"{key('time_step_limit')} must be [min, max], got {limit!r}")
    return SSMConfig(
        state_size=_int(hf, key("state_size"), 16),
        conv_kernel=_int(hf, key("conv_kernel"), 4),
        intermediate_size=inner,
        time_step_rank=rank,
        num_heads=num_heads,
        head_dim=head_dim,
        n_groups=n_groups,
        chunk_size=_int(hf, key("chunk_size"), 256),
        conv_bias=bool(hf.get(key("use_conv_bias"), True)),
        proj_bias=bool(hf.get(key("use_bias"), False)),
        time_step_limit=(_float(limit[0]), _float(limit[1])),
    )


def _float(value: Any) -> float:
    """A number, or transformers' JSON spelling of one ({"__float__": "Infinity"})."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"expected a number, got {value!r}") from None


def _layer_types(hf: dict[str, Any], num_layers: int) -> list[str]:
    """A llama-like config's `layer_types`: attention kinds, or "mamba" / "mamba2" (hybrid)."""
    types = hf.get("layer_types")
    return list(types) if types else ["attention"] * num_layers


def _hybrid_ssm(hf: dict[str, Any], hidden: int) -> SSMConfig | None:
    """A hybrid's SSM mixer, from `mamba_`-prefixed keys (mamba_state_size, ...)."""
    if not any(t in SSM_LAYER_TYPES for t in hf.get("layer_types") or []):
        return None
    return _ssm_config(hf, hidden, "mamba_")


def _ssm_params(config: ModelConfig, layer_type: str) -> int:
    """Parameters of one SSM mixer (kiln.model.ssm)."""
    s, h = config.ssm, config.hidden_size
    d, n, k = s.intermediate_size, s.state_size, s.conv_kernel
    if layer_type == "mamba":
        conv = d
        proj = h * 2 * d + d * (s.time_step_rank + 2 * n) + s.time_step_rank * d + d
        return proj + conv * (k + 1) + d * n + d + d * h
    conv = d + 2 * s.n_groups * n
    proj = h * (d + conv + s.num_heads)
    return proj + conv * (k + 1) + 3 * s.num_heads + d + d * h
