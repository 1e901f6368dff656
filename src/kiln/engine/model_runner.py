"""ModelRunner: a scheduled step -> a step plan -> the model -> the sampled next tokens.

It owns the model (transformed by kiln.engine.fuse when asked), the KV pool (sized from free
GPU memory after a profiling forward, or a fixed budget on CPU), the attention backend, and
the CUDA graphs of its steps (kiln.engine.cuda_graphs: decode-only steps by batch size,
steps with prefill tokens by token count). The kernels they all run are
one Ops (kiln.engine.ops), chosen here at start-up.

For the drafts that read the target's hidden states (kiln.engine.spec_decode.hidden) it keeps
them, in its graphs too (`keep_hidden`): "slots", every computed token's final hidden state
in `hidden_slots`, a pool addressed like the KV pool (the target's, for medusa and eagle);
"rows", the newest step's sampling rows' hidden states in `last_hidden` (EAGLE's draft, whose
next forward reads its own predictions).

Each step: `prepare` flattens the scheduled tokens, stages them on the device and decides, once,
how the step runs (a CUDA graph or eager) and how its rows are sampled (a StepPlan); `execute`
runs that plan. Lockstep and async scheduling go through the same `execute`; lockstep only
waits for the tokens before scheduling the next step.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from kiln.engine.attention import AttentionMetadata, HiddenSlots, KVCache, PagedBackend
from kiln.engine.config import CPU_KV_CACHE_BYTES, EngineConfig
from kiln.engine.cuda_graphs import (
    CudaGraphRunner,
    graph_batch_sizes,
    mixed_token_sizes,
    write_rows,
)
from kiln.engine.fuse import bind_quant_ops, fuse_model
from kiln.engine.kv_scales import KVScales, describe
from kiln.engine.lora import LoRAManager
from kiln.engine.ops import choose_ops
from kiln.engine.sampler import PendingSample, Sampler
from kiln.engine.scheduler import SchedulerOutput
from kiln.engine.sequence import Sequence
from kiln.engine.state_cache import SSMBackend, StateSlots
from kiln.engine.structured import fill_bitmask
from kiln.engine.transfer import to_device
from kiln.errors import ConfigError
from kiln.kernels.causal_attention import causal_attention
from kiln.kernels.kv_quant import KV_CACHE_DTYPES
from kiln.model.layers import MoE
from kiln.model.parallel import reduce_sublayers
from kiln.model.ssm import SSMStateCache
from kiln.model.transformer import Transformer

log = logging.getLogger("kiln.engine")

PROMPT_LOGPROBS_ROWS = 256  # prompt rows scored per LM-head call (prompt_logprobs)
_block_table = operator.attrgetter("block_table")  # of a Sequence
_lora_request = operator.attrgetter("lora_request")


def kv_cache_torch_dtype(name: str, dtype: torch.dtype, device: torch.device, ops) -> torch.dtype:
    """The pool's storage dtype for EngineConfig.kv_cache_dtype (auto: the model's `dtype`);
    ConfigError where the device cannot hold or convert it."""
    kv_dtype = KV_CACHE_DTYPES[name] or dtype
    if kv_dtype == torch.float8_e4m3fn:
        if device.type == "mps":
            raise ConfigError(f"kv_cache_dtype={name!r}: MPS has no fp8; use int8 or auto")
        if device.type == "cuda" and ops.name == "triton":
            cc = torch.cuda.get_device_capability(device)
            if cc < (8, 9):
                raise ConfigError(
                    f"kv_cache_dtype={name!r}: the fp8 kernels need compute capability 8.9 or "
                    f"newer (Ada, Hopper), this GPU is {cc[0]}.{cc[1]}; use int8 or auto"
                )
    return kv_dtype


class ProfileBackend:
    """Attention over the flat token list as one causal sequence (for the profiling forward)."""

    def attend(self, layer_idx, q, k, v, scale, sliding_window):
        return causal_attention(q[None], k[None], v[None], scale, 0, sliding_window)[0]


@dataclass
class PreviousTokens:
    """The previous step's sampled tokens, still on the device, and each sequence's row."""

    tokens: torch.Tensor  # [S] int64
    rows: dict[int, int]  # seq_id -> row of tokens


@dataclass
class HostInputs:
    """A step's flat inputs on the host, one-token rows (decodes) first."""

    input_ids: list[int] = field(default_factory=list)  # [N]; 0 where the token is in flight
    positions: list[int] = field(default_factory=list)  # [N]
    slots: list[int] = field(default_factory=list)  # [N]
    query_lens: list[int] = field(default_factory=list)  # [B]
    context_lens: list[int] = field(default_factory=list)  # [B]
    tables: list[list[int]] = field(default_factory=list)  # [B] block tables
    logits_indices: list[int] = field(default_factory=list)  # [S] the N rows that sample
    sample_seqs: list[Sequence] = field(default_factory=list)  # [S] their sequences
    pend_dst: list[int] = field(default_factory=list)  # rows whose token is in flight ...
    pend_src: list[int] = field(default_factory=list)  # ... their rows in prev.tokens
    # prompt logprobs: the N rows whose logits score a prompt token, that token, and
    # (sequence, how many of the rows are its), in row order
    prompt_rows: list[int] = field(default_factory=list)
    prompt_targets: list[int] = field(default_factory=list)
    prompt_seqs: list[tuple[Sequence, int]] = field(default_factory=list)
    lora_requests: list = field(default_factory=list)  # [B] each row's adapter (or None)
    row_seqs: list[Sequence] = field(default_factory=list)  # [B] each row's sequence
    num_decodes: int = 0  # the one-token rows, at the front


@dataclass
class StepPlan:
    """How the runner runs one scheduled step, decided once in ModelRunner.prepare.

    `sampling` says how the rows that reach their last token get their next one:
    - "graph": the step's CUDA graph samples every row with the fused op (ops.sample), from
      temperatures and seeds staged with its inputs;
    - "fast": the fused op samples the logits after the forward;
    - "full": the sampler's torch path (top-k/p, min-p, penalties, min_tokens, seeds, logprobs);
    - "fork": not here: the rows fork n / best_of siblings, which share their logits; the
      engine forks them, then samples;
    - "logits": not here either: the logits come back, for a verify step (a sequence with
      speculative tokens has a row for each of them and one past them) or a draft model's
      step (kiln.engine.spec_decode).
    """

    seqs: list[Sequence]  # [S] the sequences that sample, by row
    input_ids: torch.Tensor  # [N] int64 on the device
    metadata: AttentionMetadata
    logits_rows: torch.Tensor | None  # [S] the rows of the N that sample (None: all of them)
    # The CUDA graph that runs the step, its inputs staged: ("decode", rows) or ("mixed",
    # tokens) (kiln.engine.cuda_graphs); None: eager.
    graph: tuple[str, int] | None
    sampling: str  # "graph" | "graph_mask" | "fast" | "full" | "fork" | "logits"
    num_logits: int = 0  # rows of logits the step computes (a mixed graph's are these)
    prompt: HostInputs | None = None  # rows that score prompt tokens (eager steps only)


class StepOutput(NamedTuple):
    """What ModelRunner.execute queued: the sequences that sample, by row, and their tokens."""

    seqs: list[Sequence]
    sample: PendingSample | None  # None: no row samples, or they fork (see logits)
    logits: torch.Tensor | None = None  # [S', vocab] when the plan is "fork" or "logits"
    # (sequence, logprobs of its next prompt tokens) where prompt_logprobs were asked for
    prompt_logprobs: list[tuple[Sequence, list[dict[int, float]]]] | tuple = ()


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        config: EngineConfig,
        max_model_len: int,
        kv_scales: KVScales | None = None,
        extra_kv_bytes_per_block: int = 0,
        keep_hidden: str | None = None,
        kv_cache: KVCache | None = None,
    ):
        """keep_hidden: None, "slots" or "rows" (above); kv_cache: a pool shared with the
        runner that owns it (early exit's draft: the target's first layers), whose blocks,
        scales and copies are that runner's."""
        assert keep_hidden in (None, "slots", "rows")
        self.config = config
        self.model_config = model.config
        self.max_model_len = max_model_len
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.block_size = config.block_size
        self.max_blocks_per_seq = -(-max_model_len // config.block_size)
        self.ops = choose_ops(config.attention_backend, self.device)
        # multi-LoRA: reads the plain model's module names, then wraps the model it runs
        self.lora = LoRAManager(model, config, self.device) if config.enable_lora else None
        self.kv_dtype = kv_cache_torch_dtype(
            config.kv_cache_dtype, self.dtype, self.device, self.ops
        )
        ssm = model.config.num_ssm_layers > 0  # SSM layers (kiln.engine.state_cache)
        if config.fuse_weights and not ssm:
            model = fuse_model(model, self.ops, config.gemv_max_batch)
        bind_quant_ops(model, self.ops)
        if self.lora is not None:
            self.lora.wrap(model, self.ops)
        if config.tensor_parallel_size > 1:  # kiln.model.parallel: sum the ranks' partials
            reduce_sublayers(model)
        self.model = model
        # An SSM model's per-sequence state (kiln.engine.state_cache): allocated before the
        # KV pool is sized from what memory is left
        self.state_slots = None
        if ssm:
            self.state_slots = StateSlots(config.max_num_seqs)
            pool = SSMStateCache(model.config, config.max_num_seqs, self.dtype, self.device)
            per_seq = SSMStateCache.bytes_per_slot(model.config, self.dtype)
            log.info(
                "SSM state: %d slots x %.2f MiB (conv + SSM state of %d layers)",
                config.max_num_seqs, per_seq / 2**20, model.config.num_ssm_layers,
            )  # fmt: skip
        self.tp = None  # the TPDriver on rank 0 of a tensor-parallel engine (EngineCore sets it)
        self.last_plan: StepPlan | None = None  # the newest step's plan (for StepTrace)
        mc = self.model_config
        self.keep_hidden = keep_hidden
        self.last_hidden: torch.Tensor | None = None  # [S, H] "rows": the newest step's
        if kv_cache is not None:
            self.num_blocks, self.kv_cache = kv_cache.num_blocks, kv_cache
        else:
            # a draft's pool of as many blocks as this one's (and the hidden states this one
            # keeps by slot) are paid from the same budget
            if keep_hidden == "slots":
                extra_kv_bytes_per_block += HiddenSlots.bytes_per_block(
                    self.block_size, mc.hidden_size, self.dtype
                )
            self.num_blocks = self._num_kv_blocks(extra_kv_bytes_per_block)
            self.kv_cache = KVCache(
                mc.num_kv_layers,
                self.num_blocks,
                self.block_size,
                mc.num_kv_heads,
                mc.head_dim,
                self.kv_dtype,
                self.device,
            )
        if config.kv_eviction == "h2o":  # attention mass per slot, before any graph capture
            self.kv_cache.track_scores()
        if ssm:
            self.backend = SSMBackend(self.kv_cache, self.ops, pool, self.state_slots)
        else:
            self.backend = PagedBackend(self.kv_cache, self.ops)
        self.graph_runner = CudaGraphRunner(
            self.model, self.backend, self.ops, self.max_blocks_per_seq, config.max_num_seqs
        )
        self.hidden_slots = None
        if keep_hidden == "slots":  # before any graph capture: the graphs write into it
            self.hidden_slots = HiddenSlots(
                self.num_blocks, self.block_size, mc.hidden_size, self.dtype, self.device
            )
        self.graph_runner.hidden_slots = self.hidden_slots
        self.graph_runner.keep_rows = keep_hidden == "rows"
        # Only the Triton ops are capturable (the references read lengths on the host), and
        # an unfused MoE's loop reads the chosen experts on the host (FusedMoE does not).
        triton_cuda = self.device.type == "cuda" and self.ops.name == "triton"
        host_moe = any(isinstance(m, MoE) for m in self.model.modules())
        if config.use_cuda_graph and triton_cuda and not host_moe and not ssm:
            top = min(config.max_cuda_graph_batch_size, config.max_num_seqs)
            tokens = min(config.max_cuda_graph_tokens, config.max_num_batched_tokens)
            self.graph_runner.capture(graph_batch_sizes(top), mixed_token_sizes(tokens))
        if triton_cuda:
            windows = {m.sliding_window for m in model.modules() if hasattr(m, "sliding_window")}
            fused = None  # (q/k norm, RoPE) of a fused model: its decode_qkv variants too
            if config.fuse_weights:
                fused = (mc.qk_norm, mc.position_embedding != "learned")
            self.backend.compile_kernels(
                mc.num_heads, windows, config.max_num_seqs, fused_qkv=fused, dtype=self.dtype
            )
        if kv_cache is None:  # (a shared pool's scales are its owner's)
            self._init_kv_scales(kv_scales)  # after the captures: they must not calibrate

    def _init_kv_scales(self, checkpoint: KVScales | None) -> None:
        """Set an fp8 / int8 pool's scales (kiln.engine.kv_scales) and log which are in force."""
        cfg, cache = self.config, self.kv_cache
        if cache.scales is None:
            return
        if checkpoint is not None and cfg.calculate_kv_scales is not True:
            for i, (k, v) in enumerate(zip(checkpoint.k_scale, checkpoint.v_scale)):
                cache.set_scales(i, k, v)
            log.info("KV scales: %s", describe(checkpoint))
        elif cfg.calculate_kv_scales is False:
            log.warning(
                "KV scales: 1.0 for every layer and kv head (calculate_kv_scales=False and the "
                "checkpoint has none): values past %s's range saturate", cfg.kv_cache_dtype
            )  # fmt: skip
        else:
            self.backend.calibrating = True
            why = (
                "calculate_kv_scales=True" if cfg.calculate_kv_scales else "none in the checkpoint"
            )
            log.info("KV scales: calculated from the first prefill step (%s)", why)

    def _finish_calibration(self) -> None:
        self.backend.calibrating = False
        s = self.kv_cache.scales
        log.info("KV scales: %s", describe(KVScales(s[:, 0], s[:, 1], "calculated")))

    # ------------------------------------------------------------------ KV pool size

    def _num_kv_blocks(self, extra_bytes_per_block: int = 0) -> int:
        mc, cfg = self.model_config, self.config
        per_block = extra_bytes_per_block + KVCache.bytes_per_block(
            mc.num_kv_layers, self.block_size, mc.num_kv_heads, mc.head_dim, self.kv_dtype
        )
        if not per_block:  # no attention layer: the blocks are bookkeeping only
            num_blocks = cfg.num_kv_blocks or cfg.max_num_seqs * self.max_blocks_per_seq
            per_block = 1
        elif cfg.num_kv_blocks is not None:
            num_blocks = cfg.num_kv_blocks
        elif cfg.kv_cache_memory_bytes is not None:
            num_blocks = cfg.kv_cache_memory_bytes // per_block
        elif self.device.type != "cuda":
            num_blocks = CPU_KV_CACHE_BYTES // per_block
        else:
            num_blocks = int(self._profile_free_bytes() // per_block)
            if cfg.tensor_parallel_size > 1:  # one block table addresses every rank's pool
                least = torch.tensor(num_blocks, device=self.device)
                torch.distributed.all_reduce(least, torch.distributed.ReduceOp.MIN)
                num_blocks = int(least)
        if num_blocks < self.max_blocks_per_seq:
            need = self.max_blocks_per_seq * per_block
            raise ConfigError(
                f"the KV cache holds {max(num_blocks, 0)} blocks "
                f"({max(num_blocks, 0) * self.block_size} tokens, "
                f"{max(num_blocks, 0) * per_block / 2**20:.1f} MiB), too few for one "
                f"{self.max_model_len}-token sequence, which needs {self.max_blocks_per_seq} blocks"
                f" ({need / 2**20:.1f} MiB): give more memory (gpu_memory_utilization, "
                f"kv_cache_memory_bytes) or lower max_model_len"
            )
        log.info(
            "KV cache: %d blocks x %d = %d tokens (%.2f GiB, %s, kv_cache_dtype %s: %s)",
            num_blocks, self.block_size, num_blocks * self.block_size,
            num_blocks * per_block / 2**30, self.device, cfg.kv_cache_dtype,
            str(self.kv_dtype).removeprefix("torch."),
        )  # fmt: skip
        return num_blocks

    @torch.inference_mode()
    def _profile_free_bytes(self) -> float:
        """Bytes left for the KV pool after a forward of a full token budget."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        n = self.config.max_num_batched_tokens
        ids = torch.randint(0, self.model_config.vocab_size, (n,), device=self.device)
        positions = torch.arange(n, device=self.device) % self.max_model_len
        hidden = self.model.hidden_states(ids, positions, ProfileBackend())
        rows = min(self.config.max_num_seqs, n)
        logits = self.model.compute_logits(hidden[:rows]).float()
        del hidden, logits
        torch.cuda.synchronize()
        activations = torch.cuda.max_memory_allocated() - base
        sampler = 6 * self.config.max_num_seqs * self.model_config.vocab_size * 4  # float32 copies
        free, total = torch.cuda.mem_get_info()
        budget = total * self.config.gpu_memory_utilization - (total - free)
        return budget - activations - sampler

    # ------------------------------------------------------------------ one step

    @torch.inference_mode()
    def execute(
        self,
        out: SchedulerOutput,
        prev: PreviousTokens | None,
        sampler: Sampler,
        logits_only: bool = False,
        before_sample: Callable[[list[Sequence]], None] | None = None,
    ) -> StepOutput:
        """Queue the step on the device, and the sampling of the next token of each sequence
        that reaches its last one, as prepare() plans it (nothing here waits for the GPU).

        A decode whose input token is still in flight (async scheduling) reads it from `prev`,
        the previous step's sampled tokens on the device. A verify step (sequences with
        speculative tokens) or `logits_only` returns the logits instead of sampling: a row per
        sequence, and one per speculative token before it. `before_sample(seqs)` runs on the
        host once the forward is queued and before the sampling is (the engine brings the
        sequences' grammars up to date there, while the GPU runs the forward)."""
        self.kv_cache.copy_blocks(out.block_copies)
        if self.kv_cache.scores is not None:  # H2O: a sequence's mass is its last step's
            self.kv_cache.reset_scores([b for seq in out.seqs for b in seq.block_table])
        plan = self.last_plan = self.prepare(out, prev, sampler, logits_only)
        if self.tp is not None:  # the workers run the same forward on the same inputs
            self.tp.send_step(plan, out.block_copies, self.graph_runner)
        logits, sampled, prompt = self._forward(plan)
        if not plan.seqs:
            return StepOutput([], None, prompt_logprobs=prompt)
        if plan.sampling == "graph":
            return StepOutput(plan.seqs, PendingSample(*sampled))
        if plan.sampling in ("fork", "logits"):
            return StepOutput(plan.seqs, None, logits, prompt)
        if before_sample is not None:
            before_sample(plan.seqs)
        if plan.sampling == "graph_mask":
            bitmask = fill_bitmask([s.grammar for s in plan.seqs], sampler.vocab_size, self.device)
            sampled = self.graph_runner.sample_masked(plan.graph, len(plan.seqs), bitmask)
            return StepOutput(plan.seqs, PendingSample(*sampled))
        sample = sampler.sample(logits, plan.seqs, plan.sampling == "fast")
        return StepOutput(plan.seqs, sample, prompt_logprobs=prompt)

    def _forward(self, plan: StepPlan):
        """Run the model over the step: the sampling rows' logits [S, vocab] (None if no row
        samples in an eager step), where the graph samples them (tokens, logprobs), and the
        prompt logprobs asked for (read back to the host: such requests run lockstep)."""
        if plan.graph is not None:  # the inputs are staged in the graph's buffers already
            rows = plan.num_logits if plan.graph[0] == "mixed" else plan.metadata.num_seqs
            logits, sampled, hidden = self.graph_runner.replay(plan.graph, rows)
            if plan.logits_rows is not None:
                logits = logits[plan.logits_rows]
                hidden = None if hidden is None else hidden[plan.logits_rows]
            self.last_hidden = hidden
            return logits, sampled, []
        self.backend.set_metadata(plan.metadata)
        hidden = self.model.hidden_states(plan.input_ids, plan.metadata.positions, self.backend)
        if self.hidden_slots is not None:
            self.hidden_slots.write(plan.metadata.slot_mapping, hidden)
        prompt = self._prompt_logprobs(hidden, plan.prompt) if plan.prompt is not None else []
        if self.backend.calibrating:  # every layer's scales are set now
            self._finish_calibration()
        if not plan.seqs:
            return None, None, prompt
        if plan.logits_rows is not None:
            hidden = hidden[plan.logits_rows]
        if self.keep_hidden == "rows":
            self.last_hidden = hidden
        return self.model.compute_logits(hidden), None, prompt

    def _prompt_logprobs(self, hidden: torch.Tensor, host: HostInputs):
        """Each asking sequence's logprobs of the prompt tokens this step scores: the
        token's own and the top prompt_logprobs of the model's distribution there. Rows go
        through the LM head PROMPT_LOGPROBS_ROWS at a time (a whole prefill's [N, vocab]
        float32 logits would not fit next to the KV pool)."""
        rows, targets = (to_device(x, torch.long, self.device)
                         for x in (host.prompt_rows, host.prompt_targets))  # fmt: skip
        k = max(seq.params.prompt_logprobs for seq, _ in host.prompt_seqs)
        chosen, vals, ids = [], [], []
        for at in range(0, len(rows), PROMPT_LOGPROBS_ROWS):
            part = slice(at, at + PROMPT_LOGPROBS_ROWS)
            logprobs = self.model.compute_logits(hidden[rows[part]]).float().log_softmax(-1)
            chosen += logprobs.gather(1, targets[part, None])[:, 0].tolist()
            if k:
                top = logprobs.topk(k, dim=-1)
                vals += top.values.tolist()
                ids += top.indices.tolist()
        out, at = [], 0
        for seq, n in host.prompt_seqs:
            want = seq.params.prompt_logprobs
            lps = []
            for j in range(at, at + n):
                d = dict(zip(ids[j][:want], vals[j][:want])) if want else {}
                d[host.prompt_targets[j]] = chosen[j]
                lps.append(d)
            out.append((seq, lps))
            at += n
        return out

    def prepare(
        self,
        out: SchedulerOutput,
        prev: PreviousTokens | None,
        sampler: Sampler,
        logits_only: bool = False,
    ) -> StepPlan:
        """The step's plan: its inputs staged on the device (a step that fits a CUDA graph: in
        the graph's buffers), the rows that sample, and how they sample (the sampler's fast
        path, asked once here; in the graph when every row takes it)."""
        host = self._flatten(out, prev)
        seqs, b = host.sample_seqs, len(host.tables)
        num_logits = len(host.logits_indices)
        graphs = self.graph_runner
        graph = None
        if self.state_slots is not None:  # eager, each row's state slot staged
            first = [host.positions[i] for i in np.cumsum([0, *host.query_lens[:-1]])]
            self.backend.stage(host.row_seqs, first, self.device)
        elif self.backend.calibrating or host.prompt_rows:
            pass  # eager: the step sets the KV scales / reads every row's hidden state
        elif host.num_decodes == b and (size := graphs.batch_size(b)) is not None:
            graph = ("decode", size)
        elif (size := graphs.mixed_size(len(host.input_ids), max(b, num_logits))) is not None:
            graph = ("mixed", size)
        fast = sampler.fast_path_ok(seqs)
        every_row = len(seqs) == b or (graph is not None and graph[0] == "mixed")
        if logits_only or any(out.num_spec_tokens):
            sampling = "logits"
        elif any(s.pending_forks for s in seqs):
            sampling = "fork"
        elif graph is not None and fast and graphs.sample_in_graph and every_row:
            # a grammar's mask is filled once the forward is queued: a graph of its own samples
            grammar = any(s.grammar is not None for s in seqs)
            sampling = "graph_mask" if grammar else "graph"
        else:
            sampling = "fast" if fast else "full"
        if self.lora is not None:  # each token's adapter slot, in the graph's buffer too
            size = graph[1] if graph is not None else len(host.input_ids)
            self.lora.stage(host.lora_requests, host.query_lens, size, graph is not None)
        if graph is None:
            ids, md, rows = self._stage_eager(host, prev)
            prompt = host if host.prompt_rows else None
            return StepPlan(seqs, ids, md, rows, None, sampling, num_logits, prompt)
        temps = seeds = None
        if sampling in ("graph", "graph_mask"):
            temps, seeds = sampler.fast_path_inputs(seqs)
        if graph[0] == "mixed":  # the graph computes the sampling rows' logits only
            ids, md = graphs.stage_mixed(graph[1], prev, host, temps, seeds)
            return StepPlan(seqs, ids, md, None, graph, sampling, num_logits)
        ids, md = graphs.stage(
            graph[1], prev, host.input_ids, host.positions, host.slots, host.context_lens,
            host.tables, host.pend_dst, host.pend_src, temps, seeds,
        )  # fmt: skip
        rows = None
        if num_logits < b:
            rows = to_device(host.logits_indices, torch.int64, self.device)
        return StepPlan(seqs, ids, md, rows, graph, sampling, num_logits)

    def _flatten(self, out: SchedulerOutput, prev: PreviousTokens | None) -> HostInputs:
        """The scheduled tokens as flat host lists, one-token rows first. A sequence with
        speculative tokens feeds its last known token and them, and has logits at each."""
        seqs, num_new = out.seqs, out.num_new_tokens
        num_decodes = num_new.count(1)
        # decodes first; the tokens of one adapter side by side (kiln.kernels.lora's tiles)
        if self.lora is not None:
            order = sorted(range(len(out)), key=lambda i: (num_new[i] != 1, seqs[i].lora_int_id))
        elif num_decodes == len(out):  # (most steps)
            order = None
        else:
            order = [i for i, n in enumerate(num_new) if n == 1]
            order += [i for i, n in enumerate(num_new) if n != 1]
        if order is None:
            decodes, chunks = seqs, []
        else:
            decodes = [seqs[i] for i in order[:num_decodes]]
            chunks = [(seqs[i], num_new[i]) for i in order[num_decodes:]]
        host = HostInputs(num_decodes=num_decodes)
        self._flatten_decodes(host, decodes, prev)
        self._flatten_chunks(host, chunks)
        return host

    def _flatten_decodes(
        self, host: HostInputs, seqs: list[Sequence], prev: PreviousTokens | None
    ) -> None:
        """One-token rows (decodes; no speculative tokens) onto the empty host lists: a tight
        loop, as every step carries up to max_num_seqs of them."""
        bs = self.block_size
        input_ids, pend_dst, pend_src = host.input_ids, host.pend_dst, host.pend_src
        add_id, add_pos, add_slot = input_ids.append, host.positions.append, host.slots.append
        add_context, add_logits = host.context_lens.append, host.logits_indices.append
        add_sample_seq = host.sample_seqs.append
        for row, seq in enumerate(seqs):
            start, token_ids = seq.num_computed_tokens, seq.token_ids
            if seq.prompt_logprobs is not None:
                self._add_prompt_rows(host, seq, start, start + 1)
            if start < len(token_ids):  # (plain ints beat numpy on one element)
                add_id(token_ids[start])
            else:  # sampled last step, not read back yet
                pend_dst.append(row)
                pend_src.append(prev.rows[seq.seq_id])
                add_id(0)
            c = start - seq.num_evicted_tokens  # cache index of token `start` (KV eviction)
            table = seq.block_table
            add_pos(start)
            add_slot(table[c // bs] * bs + c % bs)
            add_context(c + 1)
            if start + 1 == len(token_ids) + seq.num_pending:  # its last token: it samples
                add_logits(row)
                add_sample_seq(seq)
        host.query_lens += [1] * len(seqs)
        host.tables += map(_block_table, seqs)
        host.lora_requests += map(_lora_request, seqs)
        host.row_seqs += seqs

    def _flatten_chunks(self, host: HostInputs, rows: list[tuple[Sequence, int]]) -> None:
        """Rows of several tokens (prefill chunks; a decode with speculative tokens), as
        (sequence, tokens), onto the host lists after the decodes."""
        bs = self.block_size
        input_ids, positions, slots = host.input_ids, host.positions, host.slots
        for seq, n in rows:
            start = seq.num_computed_tokens
            end = start + n
            token_ids, table, spec = seq.token_ids, seq.block_table, seq.spec_token_ids
            if seq.prompt_logprobs is not None:
                self._add_prompt_rows(host, seq, start, end)
            evicted = seq.num_evicted_tokens
            c = start - evicted  # cache index of token `start` (KV eviction)
            input_ids.extend(token_ids[start:end])
            input_ids.extend(spec)
            positions.extend(range(start, end))
            idx = np.arange(c, c + n)
            slots.extend((np.asarray(table)[idx // bs] * bs + idx % bs).tolist())
            host.query_lens.append(n)
            host.lora_requests.append(seq.lora_request)
            host.row_seqs.append(seq)
            host.context_lens.append(end - evicted)
            host.tables.append(table)
            if end == len(token_ids) + seq.num_pending + len(spec):  # (len(seq) + spec)
                if spec:
                    host.logits_indices.extend(range(len(input_ids) - n, len(input_ids)))
                else:
                    host.logits_indices.append(len(input_ids) - 1)
                host.sample_seqs.append(seq)

    @staticmethod
    def _add_prompt_rows(host: HostInputs, seq: Sequence, start: int, end: int) -> None:
        """The rows of tokens [start, end) of `seq`, about to be appended, whose logits score
        a prompt token not scored yet (prompt_logprobs)."""
        if scored := seq.needs_prompt_logprobs(start, end):
            row = len(host.input_ids) - start  # of token 0
            host.prompt_rows.extend(row + p for p in scored)
            host.prompt_targets.extend(seq.token_ids[p + 1] for p in scored)
            host.prompt_seqs.append((seq, len(scored)))

    def _stage_eager(self, host: HostInputs, prev: PreviousTokens | None):
        """(input ids, metadata, logits rows or None for all) of an eager step on the device:
        one host buffer, one (pinned, asynchronous on CUDA) copy."""
        tables, query_lens = host.tables, host.query_lens
        b, width = len(tables), max(map(len, tables))
        padded = np.zeros((b, width), dtype=np.int64)
        write_rows(padded, tables)
        n_tok = len(host.input_ids)
        logits_indices = host.logits_indices
        every_row = len(logits_indices) == n_tok
        if every_row:
            logits_indices = []
        n_idx, n_pend = len(logits_indices), len(host.pend_dst)
        parts = [host.input_ids, host.positions, host.slots, logits_indices, host.pend_dst]
        parts += [host.pend_src, host.context_lens, np.cumsum([0, *query_lens]), padded.ravel()]
        dev = to_device(np.concatenate(parts).astype(np.int64), torch.int64, self.device)
        ids, pos_d, slot_d = dev[:n_tok], dev[n_tok : 2 * n_tok], dev[2 * n_tok : 3 * n_tok]
        at = 3 * n_tok
        rows = None if every_row else dev[at : at + n_idx]
        at += n_idx
        if n_pend:
            dst, src = dev[at : at + n_pend], dev[at + n_pend : at + 2 * n_pend]
            ids[dst] = prev.tokens[src]
        rest = dev[at + 2 * n_pend :].to(torch.int32)
        md = AttentionMetadata(
            positions=pos_d,
            slot_mapping=slot_d,
            block_tables=rest[2 * b + 1 :].view(b, width),
            context_lens=rest[:b],
            cu_seqlens_q=rest[b : 2 * b + 1],
            num_decodes=host.num_decodes,
            query_lens=query_lens,
        )
        return ids, md, rows
