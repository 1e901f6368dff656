"""Training configs: plain dataclasses, read from a TOML file, every field overridable.

    [data]   corpus, tokenizer ("bpe" | "char" | a tokenizer directory), vocab_size, ...
    [model]  model_type, num_layers, hidden_size, block_size, dropout, ...
    [train]  TrainConfig: out_dir, max_steps, batch_size, lr, ... (shared with SFT / DPO)

FinetuneConfig is TrainConfig with fine-tuning's defaults; DPOConfig, KTOConfig, RewardConfig,
GRPOConfig and PPOConfig the losses of `kiln dpo`, `kiln kto`, `kiln reward`, `kiln grpo` and
`kiln ppo`, RolloutConfig how the RL verbs sample.

Field names are unique across sections, so an override names the field alone
(`max_steps=100`) or with its section (`train.max_steps=100`). No torch import here: the CLIs
build their flags from these dataclasses (kiln.flags), so a default lives only here.
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
    """Optimization and bookkeeping knobs shared by pretrain, SFT and DPO (the defaults are
    pretraining's; FinetuneConfig holds fine-tuning's)."""

    out_dir: str = field(
        default="runs/pretrain", metadata={"help": "where the checkpoint, log and plot go"}
    )
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "rows per micro-batch per process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=3e-5, metadata={"help": "learning rate at the end of the decay"})
    warmup_steps: int = field(default=100, metadata={"help": "steps of linear warmup to lr"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW's, on matrices only"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW's"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW's"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0: no clipping)"})
    eval_interval: int = field(default=250, metadata={"help": "steps between validations"})
    eval_steps: int = field(default=20, metadata={"help": "batches per validation"})
    log_interval: int = field(default=10, metadata={"help": "steps between log lines"})
    ckpt_interval: int = field(default=500, metadata={"help": "steps between checkpoints"})
    dtype: str = field(
        default="auto",
        metadata={"choices": ["auto", "bfloat16", "float32"],
                  "help": "auto: bfloat16 autocast on CUDA, float32 on CPU"},
    )  # fmt: skip
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, ..."})
    seed: int = field(default=1337, metadata={"help": "of the weights, data order and dropout"})
    fsdp: bool = field(
        default=False,
        metadata={"help": "under torchrun: shard with FSDP instead of replicating with DDP"},
    )
    # kiln pretrain under torchrun: the model cut into this many pipeline stages (ranks), the
    # rest of the world data-parallel; each step's grad_accum micro-batches go through them
    pipeline_parallel: int = field(
        default=1, metadata={"help": "pretrain under torchrun: pipeline stages (ranks)"}
    )
    pipeline_schedule: str = field(
        default="1f1b",
        metadata={"choices": ["gpipe", "1f1b"], "help": "pipeline schedule (1f1b: grad_accum "
                  ">= pipeline_parallel)"},
    )  # fmt: skip

    def validate(self) -> None:
        at_least_one = ("max_steps", "batch_size", "grad_accum", "log_interval", "eval_interval")
        for name in (*at_least_one, "eval_steps", "ckpt_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in ("auto", "bfloat16", "float32"):
            raise ConfigError(f"dtype must be auto, bfloat16 or float32, got {self.dtype!r}")
        if self.pipeline_parallel < 1:
            raise ConfigError(f"pipeline_parallel must be >= 1, got {self.pipeline_parallel}")
        if self.pipeline_parallel > 1 and self.fsdp:
            raise ConfigError("pipeline_parallel composes with data parallelism, not with fsdp")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")


def _retuned(name: str, default: Any) -> Any:
    """TrainConfig's field `name` with another default (its help kept)."""
    return field(default=default, metadata=TrainConfig.__dataclass_fields__[name].metadata)


@dataclass
class FinetuneConfig(TrainConfig):
    """TrainConfig with fine-tuning's defaults (`kiln sft`, `kiln dpo`): a short run from trained
    weights, so a short warmup and no weight decay. A None is derived from the run (`resolve`)."""

    out_dir: str | None = field(
        default=None, metadata={"help": "where the checkpoint and log go (OUT/run if unset)"}
    )
    max_steps: int = _retuned("max_steps", 200)
    batch_size: int = _retuned("batch_size", 8)
    lr: float | None = field(
        default=None, metadata={"help": "peak learning rate (2e-4 with LoRA, 2e-5 full if unset)"}
    )
    min_lr: float | None = field(
        default=None, metadata={"help": "learning rate at the end of the decay (lr / 10 if unset)"}
    )
    warmup_steps: int = _retuned("warmup_steps", 10)
    weight_decay: float = _retuned("weight_decay", 0.0)
    eval_interval: int = _retuned("eval_interval", 50)
    eval_steps: int = _retuned("eval_steps", 5)
    ckpt_interval: int | None = field(
        default=None, metadata={"help": "steps between checkpoints (max_steps if unset)"}
    )

    def resolve(self, out: str | Path, lora: bool) -> FinetuneConfig:
        """A copy with every None filled in, for a run that exports to `out`."""
        lr = self.lr if self.lr is not None else (2e-4 if lora else 2e-5)
        return dataclasses.replace(
            self,
            out_dir=self.out_dir if self.out_dir is not None else str(Path(out) / "run"),
            lr=lr,
            min_lr=self.min_lr if self.min_lr is not None else lr / 10,
            ckpt_interval=self.ckpt_interval if self.ckpt_interval is not None else self.max_steps,
        )


DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")


@dataclass
class DPOConfig:
    """`kiln dpo`'s preference loss (TRL's names; kiln.train.dpo has the formulas)."""

    beta: float = field(
        default=0.1, metadata={"help": "how strongly the policy is held to the reference"}
    )
    loss_type: str = field(
        default="sigmoid", metadata={"choices": list(DPO_LOSS_TYPES), "help": "the DPO loss"}
    )


REWARD_HELP = "a Python reward function, module:function or path/file.py:function"


@dataclass
class RewardConfig:
    """`kiln reward`'s Bradley-Terry loss (TRL's RewardTrainer names)."""

    center_rewards_coefficient: float | None = field(
        default=None, metadata={"help": "weight of mean((r_chosen + r_rejected)^2), to center"}
    )


@dataclass
class RolloutConfig:
    """How kiln's engine samples the completions of the RL verbs (`kiln grpo`, `kiln ppo`,
    `kiln rft`). A rollout holds batch_size * grad_accum * rollout_steps completions,
    num_generations for each of its prompts."""

    num_generations: int = field(default=8, metadata={"help": "completions per prompt"})
    max_completion_length: int = field(default=64, metadata={"help": "tokens per completion"})
    temperature: float = field(default=1.0, metadata={"help": "of the sampling and the logps"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling of the rollouts"})
    rollout_steps: int = field(
        default=1, metadata={"help": "optimizer steps a rollout feeds (per pass over it)"}
    )
    gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "the engine's share of GPU memory (training has the rest)"}
    )
    reward: str | None = field(default=None, metadata={"help": REWARD_HELP})
    reward_model: str | None = field(
        default=None, metadata={"help": "a reward model directory (`kiln reward`) to score with"}
    )


GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclass
class GRPOConfig:
    """`kiln grpo`'s objective (TRL's GRPOConfig names; kiln.train.grpo has the formulas)."""

    beta: float = field(default=0.04, metadata={"help": "weight of the KL to the reference"})
    epsilon: float = field(default=0.2, metadata={"help": "ratio clipping, lower side"})
    epsilon_high: float | None = field(
        default=None, metadata={"help": "ratio clipping, upper side (epsilon if unset)"}
    )
    loss_type: str = field(
        default="dapo", metadata={"choices": list(GRPO_LOSS_TYPES), "help": "token aggregation"}
    )
    scale_rewards: str = field(
        default="group",
        metadata={"choices": ["group", "batch", "none"], "help": "advantages divided by std"},
    )
    num_iterations: int = field(default=1, metadata={"help": "passes over each rollout"})


@dataclass
class PPOConfig:
    """`kiln ppo`'s objective (TRL v0.23's PPOConfig names; kiln.train.ppo has the formulas)."""

    kl_coef: float = field(default=0.05, metadata={"help": "KL penalty in the per-token reward"})
    kl_estimator: str = field(
        default="k1", metadata={"choices": ["k1", "k3"], "help": "the KL penalty's estimator"}
    )
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clipping"})
    cliprange_value: float = field(default=0.2, metadata={"help": "value clipping"})
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss"})
    gamma: float = field(default=1.0, metadata={"help": "discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE's lambda"})
    num_ppo_epochs: int = field(default=4, metadata={"help": "passes over each rollout"})
    whiten_rewards: bool = field(default=False, metadata={"help": "whiten the rewards"})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "subtracted from the score of a completion without EOS"}
    )


KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclass
class KTOConfig:
    """`kiln kto`'s loss (TRL's KTOConfig names; kiln.train.kto has the formulas)."""

    beta: float = field(default=0.1, metadata={"help": "how strongly held to the reference"})
    desirable_weight: float = field(default=1.0, metadata={"help": "weight of desirable losses"})
    undesirable_weight: float = field(
        default=1.0, metadata={"help": "weight of undesirable losses"}
    )
    loss_type: str = field(
        default="kto", metadata={"choices": list(KTO_LOSS_TYPES), "help": "the KTO loss"}
    )


@dataclass
class DataSpec:
    """Where the tokens come from."""

    corpus: str = field(
        default="data/shakespeare", metadata={"help": "a .txt file or a directory of .txt files"}
    )
    tokenizer: str = field(
        default="bpe",
        metadata={"help": "bpe (train kiln's BPE), char, or an existing tokenizer directory"},
    )
    vocab_size: int = field(default=4096, metadata={"help": "for tokenizer = bpe"})
    pattern: str = field(
        default="gpt2", metadata={"help": "BPE pre-tokenization regex: gpt2 or gpt4"}
    )
    val_fraction: float = field(
        default=0.1, metadata={"help": "share of documents held out for validation"}
    )
    chat_template: str = field(
        default="",
        metadata={"help": "chatml: ChatML's turn markers as special tokens, and its template"},
    )


@dataclass
class ModelSpec:
    """The architecture to train (a Llama- or GPT-2-family kiln Transformer)."""

    model_type: str = field(
        default="llama",
        metadata={"help": "llama (RoPE, RMSNorm, SwiGLU) or gpt2 (learned positions, LN, GELU); "
                  "mixtral / qwen3_moe: llama with MoE MLPs"},
    )  # fmt: skip
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = field(default=0, metadata={"help": "0: num_heads"})
    hidden_size: int = 256
    intermediate_size: int = field(
        default=0, metadata={"help": "0: 4 * hidden (gpt2) or ~8/3 * hidden rounded to 64 (llama)"}
    )
    block_size: int = field(
        default=256, metadata={"help": "training context (= max_position_embeddings)"}
    )
    dropout: float = field(
        default=0.0, metadata={"help": "on embeddings and residual branches, training only"}
    )
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    init_std: float = 0.02
    # mixture of experts (model_type mixtral or qwen3_moe)
    num_experts: int = field(default=8, metadata={"help": "experts per MoE layer"})
    num_experts_per_tok: int = field(default=2, metadata={"help": "top-k experts a token"})
    switch_routing: bool = field(
        default=False,
        metadata={"help": "Switch Transformer routing: top-1, the output scaled by the router "
                  "probability (qwen3_moe)"},
    )  # fmt: skip
    router_aux_loss_coef: float = field(
        default=0.01, metadata={"help": "weight of the load-balancing loss"}
    )
    router_z_loss_coef: float = field(default=0.0, metadata={"help": "weight of the z-loss"})
    # ALBERT's weight sharing (kiln.model.sharing); the export is a plain model either way
    share_layers: int = field(
        default=1,
        metadata={"help": "cross-layer sharing: each run of this many consecutive layers "
                  "trains one layer's weights (num_layers: all share one; 1: none)"},
    )  # fmt: skip
    embedding_size: int = field(
        default=0,
        metadata={"help": "factorized embeddings: tokens embed in this many dims, projected "
                  "up to hidden_size (0: off)"},
    )  # fmt: skip


@dataclass
class PretrainConfig:
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainConfig = field(default_factory=TrainConfig)


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
