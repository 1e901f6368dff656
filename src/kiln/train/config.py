"""Training configs: plain dataclasses, read from a TOML file, every field overridable.

    [data]   corpus, tokenizer ("bpe" | "char" | a tokenizer directory), vocab_size, ...
    [model]  model_type, num_layers, hidden_size, block_size, dropout, ...
    [train]  TrainConfig: out_dir, max_steps, batch_size, lr, ... (shared with SFT / DPO)

Field names are unique across sections, so an override names the field alone
(`max_steps=100`) or with its section (`train.max_steps=100`). No torch import here: the CLI
builds its `--field` options from these dataclasses.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError


@dataclass
class TrainConfig:
    """Optimization and bookkeeping knobs shared by pretrain, SFT and DPO."""

    out_dir: str
    max_steps: int
    batch_size: int  # rows per micro-batch per process
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 250
    eval_steps: int = 20
    log_interval: int = 10
    ckpt_interval: int = 500
    dtype: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "bfloat16" | "float32"
    compile: bool = False
    device: str = "auto"
    seed: int = 1337
    fsdp: bool = False  # under torchrun: shard with FSDP instead of replicating with DDP

    def validate(self) -> None:
        at_least_one = ("max_steps", "batch_size", "grad_accum", "log_interval", "eval_interval")
        for name in (*at_least_one, "eval_steps", "ckpt_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in ("auto", "bfloat16", "float32"):
            raise ConfigError(f"dtype must be auto, bfloat16 or float32, got {self.dtype!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")


@dataclass
class DataSpec:
    """Where the tokens come from."""

    corpus: str = "data/shakespeare"  # a .txt file or a directory of .txt documents
    tokenizer: str = "bpe"  # "bpe" (train kiln's BPE), "char", or an existing tokenizer dir
    vocab_size: int = 4096  # for tokenizer = "bpe"
    pattern: str = "gpt2"  # BPE pre-tokenization regex: "gpt2" | "gpt4"
    val_fraction: float = 0.1  # share of documents held out for validation
    chat_template: str = ""  # "chatml": ChatML's turn markers as special tokens, and its template


@dataclass
class ModelSpec:
    """The architecture to train (a Llama- or GPT-2-family kiln Transformer)."""

    model_type: str = "llama"  # "llama" (RoPE, RMSNorm, SwiGLU) | "gpt2" (learned pos, LN, GELU)
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 0  # 0 = num_heads
    hidden_size: int = 256
    intermediate_size: int = 0  # 0 = 4 * hidden (gpt2) or ~8/3 * hidden rounded to 64 (llama)
    block_size: int = 256  # training context = max_position_embeddings
    dropout: float = 0.0  # on embeddings and residual branches, training only
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    init_std: float = 0.02


@dataclass
class PretrainConfig:
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainConfig = field(default_factory=lambda: TrainConfig("runs/pretrain", 1000, 16))


SECTIONS = {"data": DataSpec, "model": ModelSpec, "train": TrainConfig}


def field_index() -> dict[str, tuple[str, dataclasses.Field]]:
    """field name -> (section, field), over every section."""
    index: dict[str, tuple[str, dataclasses.Field]] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in index, f"field {f.name!r} appears in two sections"
            index[f.name] = (section, f)
    return index


def load_config(path: str | Path | None, overrides: dict[str, str] | None = None) -> PretrainConfig:
    """Read a TOML config (None = all defaults) and apply `key=value` overrides (strings)."""
    raw: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        try:
            doc = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {where!r} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{where}: not valid TOML ({e})") from None
        for section, values in doc.items():
            if section not in SECTIONS or not isinstance(values, dict):
                raise ConfigError(
                    f"{where}: unknown section [{section}]; known: data, model, train"
                )
            raw[section].update(values)
    index = field_index()
    for section, values in raw.items():
        for name, value in values.items():
            if name not in index or index[name][0] != section:
                raise ConfigError(f"{where}: unknown field {name!r} in [{section}]")
            values[name] = _typed(name, value, index[name][1], where)
    for key, text in (overrides or {}).items():
        section, _, name = key.rpartition(".")
        if name not in index or section not in ("", index[name][0]):
            raise ConfigError(f"unknown config field {key!r}")
        raw[index[name][0]][name] = _typed(name, _parse_text(text), index[name][1], "override")
    defaults = PretrainConfig()
    built = {}
    for section, cls in SECTIONS.items():
        base = dataclasses.asdict(getattr(defaults, section))
        built[section] = cls(**(base | raw[section]))
    return PretrainConfig(**built)


def _parse_text(text: str) -> Any:
    """A command-line value: TOML syntax if it parses (1e-3, true, "x"), else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _typed(name: str, value: Any, f: dataclasses.Field, where: str) -> Any:
    kind = {"int": int, "float": float, "bool": bool, "str": str}[f.type]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and not isinstance(value, str):
        return str(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: field {name!r} wants {f.type}, got {value!r}")
    return value
