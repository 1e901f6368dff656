"""EngineConfig: the engine's knobs (vLLM's names), each a plain value."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from kiln.engine.spec_decode.config import SpeculativeConfig
from kiln.errors import InputError
from kiln.flags import add_flags, flags_given

CPU_KV_CACHE_BYTES = 64 * 2**20  # the KV pool on CPU when kv_cache_memory_bytes is not given


@dataclass
class EngineConfig:
    """How the engine schedules and where it keeps the KV cache."""

    block_size: int = field(default=16, metadata={"help": "tokens per KV block"})
    num_kv_blocks: int | None = field(
        default=None, metadata={"help": "KV blocks in the pool (derived from memory when unset)"}
    )
    gpu_memory_utilization: float = field(
        default=0.9, metadata={"help": "fraction of GPU memory for weights, activations, KV"}
    )
    max_num_seqs: int = field(default=256, metadata={"help": "sequences run at once"})
    max_num_batched_tokens: int = field(default=8192, metadata={"help": "tokens a step"})
    max_model_len: int | None = field(
        default=None, metadata={"help": "context length (the model's when unset)"}
    )
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    use_cuda_graph: bool = field(default=True, metadata={"help": "CUDA graphs for steps"})
    # The kernels everywhere (attention, fused layers, sampler; kiln.engine.ops): "auto"
    # (Triton on CUDA), "torch" (the references) or "triton".
    attention_backend: str = field(
        default="auto",
        metadata={"choices": ["auto", "torch", "triton"], "help": "kernels: torch references "
                  "or Triton (auto: Triton on CUDA)"},
    )  # fmt: skip
    kv_cache_memory_bytes: int | None = None  # overrides gpu_memory_utilization when given
    fuse_weights: bool = True  # fused qkv / gate_up Linears (and Triton norms on CUDA)
    max_cuda_graph_batch_size: int = 256
    # Steps that carry prefill tokens run as CUDA graphs too, up to this many tokens (a graph
    # per token count, kiln.engine.cuda_graphs); 0: decode steps only. Eager steps of a small
    # model are bound by the host's kernel launches.
    max_cuda_graph_tokens: int = 2048
    # Steps of at most this many tokens (small-batch decode) run the projections as kiln's
    # fused Triton GEMVs (norm / SiLU-mul in their prologue, weights loaded ahead under
    # programmatic dependent launch) rather than cuBLAS; 0: never. They win at batch 1 and
    # lose by batch 4 (benchmarks/bench_linear.py --chain; numbers in notes/BENCHMARKS.md).
    gemv_max_batch: int = 1
    # Weight quantization (vLLM's name): None: as the checkpoint's quantization_config says
    # (GPTQ / AWQ Linears stay packed, run by kiln.kernels.quant_linear); "none": dequantize
    # them at load time (the reference); a method name must match the checkpoint's.
    quantization: str | None = field(
        default=None,
        metadata={"help": "gptq, awq, or none (dequantize at load); default: the checkpoint's"},
    )
    # Queue step N+1 before reading step N's tokens (hides the host's work behind the GPU's);
    # None: on for CUDA. Requests with penalties or n > 1 / best_of run lockstep.
    async_scheduling: bool | None = None
    # Speculative decoding (kiln.engine.spec_decode), vLLM's keys: {"method": "ngram" |
    # "draft_model" | "medusa" | "eagle" | "early_exit", "model", "num_speculative_tokens",
    # "prompt_lookup_min", "prompt_lookup_max", "disable_by_batch_size", "exit_layer",
    # "verify"}; None: off.
    speculative_config: dict | None = field(
        default=None, metadata={"help": "speculative decoding, a JSON object (vLLM's keys)"}
    )
    # Embeddings (/v1/embeddings, kiln.LLM.embed): how a prompt's hidden states become one
    # vector.
    pooling: str = field(
        default="mean",
        metadata={"choices": ["mean", "last"], "help": "embeddings: mean of the final hidden "
                  "states, or the last token's"},
    )  # fmt: skip
    # Multi-LoRA (kiln.engine.lora), vLLM's names: requests name PEFT adapters, which run
    # together in one batch; max_loras of them resident on the device at once (the scheduler
    # admits no more distinct ones), max_cpu_loras kept on the host, ranks up to max_lora_rank.
    enable_lora: bool = field(default=False, metadata={"help": "serve LoRA adapters"})
    max_loras: int = field(default=1, metadata={"help": "LoRA adapters in a batch (device slots)"})
    max_lora_rank: int = field(default=16, metadata={"help": "highest LoRA rank served"})
    max_cpu_loras: int | None = field(
        default=None, metadata={"help": "LoRA adapters kept in host memory (max_loras if unset)"}
    )
    # The KV pool's number format (kiln.engine.kv_scales): "auto" (the model's dtype), or fp8
    # (e4m3) / int8 values with a scale per (layer, kv head): twice the tokens in the memory.
    kv_cache_dtype: str = field(
        default="auto",
        metadata={"choices": ["auto", "fp8", "fp8_e4m3", "int8"], "help": "KV cache number "
                  "format (fp8, int8: half the bytes of bf16, scales per layer and kv head)"},
    )  # fmt: skip
    # Scales of an fp8 / int8 cache: True: from the first prefill step; False: the
    # checkpoint's (self_attn.k_scale / v_scale), else 1.0 with a warning; None: the
    # checkpoint's when it has them, else from the first prefill step.
    calculate_kv_scales: bool | None = None
    # KV eviction under a per-sequence budget (kiln.engine.kv_eviction): "streaming" keeps
    # the sink tokens and the most recent blocks, "h2o" the sinks, a recent window and the
    # blocks with the most accumulated attention.
    kv_eviction: str = field(
        default="none",
        metadata={"choices": ["none", "streaming", "h2o"], "help": "evict KV blocks past "
                  "kv_budget: streaming (sinks + recent) or h2o (+ heavy hitters)"},
    )  # fmt: skip
    kv_budget: int | None = field(
        default=None, metadata={"help": "KV tokens kept per sequence under kv_eviction"}
    )
    num_sink_tokens: int = field(
        default=4, metadata={"help": "first tokens kv_eviction never evicts (attention sinks)"}
    )
    # Tensor parallelism (kiln.engine.tp_worker): the model split over this many ranks, one
    # process (and GPU) each; the engine spawns and supervises ranks 1..N-1.
    tensor_parallel_size: int = field(
        default=1, metadata={"help": "ranks (GPUs) the model is split over, Megatron-style"}
    )

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise InputError(f"block_size must be >= 1, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise InputError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.max_num_seqs < 1:
            raise InputError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if not 0 <= self.gemv_max_batch <= 16:
            raise InputError(f"gemv_max_batch must be in [0, 16], got {self.gemv_max_batch}")
        if self.max_num_batched_tokens < 1:
            raise InputError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_cuda_graph_tokens < 0:
            raise InputError(
                f"max_cuda_graph_tokens must be >= 0, got {self.max_cuda_graph_tokens}"
            )
        self._check_kv()
        self._check_tp()
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise InputError(
                f"attention_backend must be 'auto', 'torch' or 'triton', "
                f"got {self.attention_backend!r}"
            )
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise InputError(
                f"max_loras and max_lora_rank must be >= 1, got {self.max_loras} and "
                f"{self.max_lora_rank}"
            )
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        if self.max_cpu_loras < self.max_loras:
            raise InputError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})"
            )
        self.speculative: SpeculativeConfig | None = None
        if self.speculative_config is not None:
            self.speculative = SpeculativeConfig.from_dict(self.speculative_config)
            if self.kv_eviction != "none":  # verify steps reserve slots the evictor does not see
                raise InputError(
                    f"speculative_config does not combine with kv_eviction={self.kv_eviction!r}"
                )

    def _check_tp(self) -> None:
        if self.tensor_parallel_size < 1:
            raise InputError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.tensor_parallel_size == 1:
            return
        unsupported = [
            name
            for name, on in [
                ("speculative_config", self.speculative_config is not None),
                ("enable_lora", self.enable_lora),
                ("kv_eviction='h2o'", self.kv_eviction == "h2o"),
                (f"kv_cache_dtype={self.kv_cache_dtype!r}", self.kv_cache_dtype != "auto"),
            ]
            if on
        ]
        if unsupported:
            raise InputError(
                f"tensor_parallel_size={self.tensor_parallel_size} does not combine with "
                f"{', '.join(unsupported)}"
            )

    def _check_kv(self) -> None:
        if self.kv_cache_dtype not in ("auto", "fp8", "fp8_e4m3", "int8"):
            raise InputError(
                f"kv_cache_dtype must be 'auto', 'fp8', 'fp8_e4m3' or 'int8', "
                f"got {self.kv_cache_dtype!r}"
            )
        if self.kv_eviction not in ("none", "streaming", "h2o"):
            raise InputError(
                f"kv_eviction must be 'none', 'streaming' or 'h2o', got {self.kv_eviction!r}"
            )
        if self.num_sink_tokens < 0:
            raise InputError(f"num_sink_tokens must be >= 0, got {self.num_sink_tokens}")
        if self.kv_eviction == "none":
            if self.kv_budget is not None:
                raise InputError("kv_budget needs kv_eviction 'streaming' or 'h2o'")
            return
        least = self.num_sink_tokens + self.block_size
        if self.kv_budget is None or self.kv_budget < least:
            raise InputError(
                f"kv_eviction={self.kv_eviction!r} needs kv_budget >= num_sink_tokens + "
                f"block_size = {least}, got {self.kv_budget}"
            )

    @classmethod
    def add_arguments(cls, parser, skip: tuple[str, ...] = ()) -> None:
        """One --flag per field (kiln.flags), so a default lives only here: a flag left out is
        not passed on, and the field keeps its default. Booleans take --x/--no-x."""
        add_flags(parser, cls, "engine", skip)

    @classmethod
    def args_from(cls, args) -> dict[str, Any]:
        """The engine arguments a parsed namespace sets (those left out keep their default)."""
        return flags_given(cls, args)

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> EngineConfig:
        """An EngineConfig from keyword arguments; unknown names are an InputError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise InputError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(**kwargs)
