"""EngineCore: the scheduler, the block manager, the runner and the sampler; token ids in,
per-step token-id deltas out.

It knows nothing of text: detokenization and stop strings live in the OutputProcessor (in the
caller's process), which tells the core to finish a sequence when a stop string appears. The
core checks what is decided on token ids alone: EOS, stop token ids, max_tokens, the context.
`kiln.LLM` drives a core in its own process; the server drives one in an engine-core process
(kiln.engine.core_client) so that the GPU loop never waits on HTTP.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from kiln.config import ModelConfig
from kiln.engine.block_manager import BlockManager
from kiln.engine.config import EngineConfig
from kiln.engine.kv_eviction import make_evictor
from kiln.engine.kv_scales import read_kv_scales
from kiln.engine.lora import LoRARequest
from kiln.engine.model_runner import ModelRunner, PreviousTokens
from kiln.engine.outputs import SeqDelta
from kiln.engine.pooling import POOLING, embed_ids
from kiln.engine.sampler import PendingSample, Sampler, make_generator
from kiln.engine.sampling_params import SamplingParams
from kiln.engine.scheduler import Scheduler
from kiln.engine.sequence import Sequence, SequenceStatus
from kiln.engine.spec_decode.decoder import SpecDecoder, load_draft, runner_args
from kiln.engine.spec_decode.hidden import lossy_model
from kiln.engine.structured import GrammarCompiler, GrammarState, accept_tokens, tokenizer_info
from kiln.errors import ConfigError, ContextLengthError, InputError, WorkerDiedError


@dataclass
class InFlight:
    """A step queued on the device whose sampled tokens the host has not read yet."""

    seqs: list[Sequence]
    sample: PendingSample
    tokens: PreviousTokens


class CoreRequest:
    """One request inside the core: its prompt ids, its settings, its (best_of) sequences."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.seqs: list[Sequence] = []
        self.finished = False


def eos_ids_from_dir(path: Path, config: ModelConfig) -> set[int]:
    """EOS ids from generation_config.json and config.json (for a model with no tokenizer)."""
    ids: set[int] = set()
    gen = path / "generation_config.json"
    values = [config.eos_token_id]
    if gen.is_file():
        try:
            values.append(json.loads(gen.read_text()).get("eos_token_id"))
        except (ValueError, AttributeError) as e:
            raise ConfigError(f"{gen}: not a JSON object ({e})") from None
    for v in values:
        ids |= set(v) if isinstance(v, list) else {v} if v is not None else set()
    return ids


def resolve_max_model_len(config: EngineConfig, model_config: ModelConfig) -> int:
    """The engine's context: max_model_len if given (checked), else the model's."""
    context = model_config.max_position_embeddings
    max_model_len = config.max_model_len or context
    if max_model_len > context:
        raise ConfigError(f"max_model_len={max_model_len} exceeds the model's context of {context}")
    if not config.enable_chunked_prefill and config.max_num_batched_tokens < max_model_len:
        raise ConfigError(
            f"max_num_batched_tokens={config.max_num_batched_tokens} < max_model_len="
            f"{max_model_len} needs enable_chunked_prefill=True"
        )
    return max_model_len


class EngineCore:
    """EngineCore(model_dir, dtype, device, eos_token_ids=None, **engine_args)."""

    def __init__(self, model: str, dtype=None, device=None, eos_token_ids=None, **engine_args):
        from kiln.model.loader import load_model

        self.config = cfg = EngineConfig.from_kwargs(engine_args)
        self.model_path = path = Path(model)
        self.model_config = ModelConfig.from_dir(path)
        self.max_model_len = resolve_max_model_len(cfg, self.model_config)
        if eos_token_ids is None:
            eos_token_ids = eos_ids_from_dir(path, self.model_config)
        self.eos_token_ids = frozenset(eos_token_ids)
        if self.model_config.num_ssm_layers and (cfg.speculative or cfg.kv_eviction != "none"):
            raise ConfigError(
                "speculative decoding and kv_eviction need every layer's K/V: this model has "
                "SSM layers (their state cannot roll back or drop tokens)"
            )
        if self.model_config.num_ssm_layers and cfg.tensor_parallel_size > 1:
            raise ConfigError("tensor_parallel_size > 1 does not split SSM layers yet: use 1")
        self.tp = None  # rank 0's TPDriver under tensor parallelism (kiln.engine.tp_worker)
        if cfg.tensor_parallel_size > 1:
            net = self._start_tp(path, dtype, device, engine_args)
        else:
            net = load_model(path, dtype=dtype, device=device, quantization=cfg.quantization)
        spec = cfg.speculative
        draft = load_draft(spec, path, self.max_model_len, net)
        if spec is not None and not spec.verify:  # early exit alone: the target cut, lossy
            net = lossy_model(spec, net, draft)
        kv_scales = None
        if cfg.kv_cache_dtype != "auto":
            mc = net.config  # (the layers it runs: a cut model's first ones)
            kv_scales = read_kv_scales(path, mc.num_layers, mc.num_kv_heads)
        try:
            self.runner = ModelRunner(
                net, cfg, self.max_model_len, kv_scales, **runner_args(spec, draft, cfg.block_size)
            )
        except BaseException:
            self.close()
            raise
        if self.tp is not None:
            self.tp.wait_ready(self.runner.num_blocks)
            self.runner.tp = self.tp
        self.device = self.runner.device
        ssm = self.model_config.num_ssm_layers > 0  # a prefix's SSM state is not cached
        self.block_manager = BlockManager(
            self.runner.num_blocks,
            cfg.block_size,
            cfg.enable_prefix_caching and not ssm,
            self.runner.state_slots,
        )
        self.evictor = make_evictor(
            cfg, self.block_manager, self.runner.kv_cache, self.model_config
        )
        self.scheduler = Scheduler(cfg, self.block_manager, self.max_model_len, self.evictor)
        self.sampler = Sampler(self.model_config.vocab_size, self.runner.ops)
        if self.device.type == "cuda" and self.runner.ops.name == "triton":
            self.sampler.compile_kernels(self.runner.dtype, self.device)
        self.requests: dict[str, CoreRequest] = {}
        self._seq_ids = itertools.count()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        # Async scheduling: queue step N+1 on the GPU before reading step N's tokens.
        self.async_scheduling = (
            cfg.async_scheduling if cfg.async_scheduling is not None else self.device.type == "cuda"
        )
        if cfg.kv_eviction == "h2o":  # its evictions read the attention mass of the last step
            self.async_scheduling = False
        self._inflight: InFlight | None = None
        self._sync_only: set[str] = set()  # live requests that need lockstep steps
        self.spec = SpecDecoder.build(cfg, draft, self.runner, self.max_model_len)
        # structured outputs: requests whose grammar compiles (they wait; the rest run)
        self._grammar_compiler: GrammarCompiler | None = None
        self._compiling: dict[str, concurrent.futures.Future] = {}
        self._errors: list[tuple[str, str]] = []  # (request_id, why) failed outside a call
        self.trace = StepTrace.from_env()

    def _start_tp(self, path: Path, dtype, device, engine_args: dict):
        """Spawn the tensor-parallel workers; rank 0's shard of the model."""
        from kiln.engine.tp_worker import TPDriver, check_tp_engine

        check_tp_engine(self.config, self.model_config, device)
        self.tp = TPDriver(path, self.config, engine_args, self.max_model_len, dtype, device)
        try:
            return self.tp.load_shard(path, dtype)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop a tensor-parallel engine's worker processes (a no-op for one process)."""
        if self.tp is not None:
            self.tp.close()

    # ------------------------------------------------------------------ requests

    def check_prompt(self, ids: list[int]) -> list[int]:
        """`ids` if they fit the context and the vocabulary, else InputError naming both."""
        return check_prompt_ids(ids, self.max_model_len, self.model_config.vocab_size)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Queue a request (its prompt checked again: the core trusts no caller); with
        `lora_request` it runs with that adapter (read and checked here)."""
        if request_id in self.requests:
            raise InputError(f"request id {request_id!r} is already in use")
        ids = self.check_prompt(prompt_token_ids)
        check_fits_batch(params, self.config.max_num_seqs)
        if lora_request is not None:
            if self.runner.lora is None:
                raise InputError("a LoRA adapter was requested but enable_lora is off",
                                 "lora_request")  # fmt: skip
            self.runner.lora.add(lora_request)
        req = CoreRequest(request_id, ids, params)
        seq = Sequence(next(self._seq_ids), request_id, 0, ids, params, self.eos_token_ids)
        seq.pending_forks = params.best_of - 1
        seq.lora_request = lora_request
        if params.seed is not None:
            seq.generator = make_generator(params.seed, 0, self.device)
        req.seqs.append(seq)
        self.requests[request_id] = req
        if params.has_penalties or params.best_of > 1 or params.prompt_logprobs is not None:
            # penalties read the newest tokens; forks share them; prompt logprobs are read
            # back with the step that computes them
            self._sync_only.add(request_id)
        if params.structured_outputs is not None:  # scheduled once its grammar compiled
            self._compiling[request_id] = self._grammars().submit(params.structured_outputs)
        else:
            self.scheduler.add(seq)
        self.prompt_tokens_total += len(ids)

    def embed(self, prompts: list[list[int]], pooling: str | None = None) -> list[list[float]]:
        """Each prompt's pooled final hidden state (not normalized; kiln.engine.pooling)."""
        pooling = pooling or self.config.pooling
        if pooling not in POOLING:
            raise InputError(f"pooling must be one of {', '.join(POOLING)}, got {pooling!r}",
                             "pooling")  # fmt: skip
        prompts = [self.check_prompt(ids) for ids in prompts]
        if self.tp is None:
            return [embed_ids(self.runner.model, ids, pooling, self.device) for ids in prompts]
        vecs = []
        with self.tp.guard():
            for ids in prompts:
                self.tp.send_embed(ids)  # the workers run the same forward
                vecs.append(embed_ids(self.runner.model, ids, pooling, self.device))
        return vecs

    def _grammars(self) -> GrammarCompiler:
        if self._grammar_compiler is None:  # the tokenizer is read on the first use only
            info = tokenizer_info(self.model_path, self.model_config.vocab_size, self.eos_token_ids)
            self._grammar_compiler = GrammarCompiler(info)
        return self._grammar_compiler

    def _admit_compiled(self, wait: float = 0.0) -> None:
        """Schedule the requests whose grammar is ready (waiting up to `wait` s for one);
        fail those whose grammar did not compile."""
        if wait:
            concurrent.futures.wait(list(self._compiling.values()), wait,
                                    concurrent.futures.FIRST_COMPLETED)  # fmt: skip
        for rid, fut in list(self._compiling.items()):
            if not fut.done():
                continue
            del self._compiling[rid]
            if fut.exception() is not None:
                self._errors.append((rid, str(fut.exception())))
                self.abort(rid)
                continue
            (seq,) = self.requests[rid].seqs
            seq.grammar = GrammarState(fut.result())
            self.scheduler.add(seq)

    def take_errors(self) -> list[tuple[str, str]]:
        """Requests that failed inside the core since the last call (a grammar that did
        not compile), with why; they are aborted."""
        errors, self._errors = self._errors, []
        return errors

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; whether it was live."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        self._remove(request_id)
        live = [seq for seq in req.seqs if not seq.is_finished]
        for seq in live:
            seq.finish("abort")
        self.scheduler.finish_all(live)
        return True

    def finish_seq(self, request_id: str, index: int, reason: str, stop_reason=None) -> None:
        """End one sequence early (a stop string the output processor found)."""
        req = self.requests.get(request_id)
        if req is None:
            return
        for seq in req.seqs:
            if seq.index == index and not seq.is_finished:
                seq.finish(reason, stop_reason)
                self.scheduler.finish(seq)
        if all(s.is_finished for s in req.seqs):
            req.finished = True
            self._remove(request_id)

    def _remove(self, request_id: str) -> None:
        del self.requests[request_id]
        self._sync_only.discard(request_id)
        self._compiling.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def has_work(self) -> bool:
        """Requests to run, or a step on the device whose tokens are not read yet."""
        return bool(self.requests) or self._inflight is not None

    def abort_all(self) -> list[str]:
        """Abort every request and forget the step in flight (after the model failed); the
        aborted request ids."""
        rids = list(self.requests)
        for rid in rids:
            self.abort(rid)
        self._inflight = None
        return rids

    def load_weights(self, state: dict) -> None:
        """Copy a plain model's weights (kiln names, e.g. a policy being trained) into the
        running model in place, between requests; the prefix cache is dropped with them."""
        from kiln.engine.fuse import load_weights

        if self.tp is not None:
            raise ConfigError("load_weights runs on one device (tensor_parallel_size 1)")
        if self.has_work():
            raise InputError("load_weights waits for every request to finish")
        load_weights(self.runner.model, state)
        self.block_manager.reset_prefix_cache()

    # ------------------------------------------------------------------ one step

    def step(self) -> list[SeqDelta]:
        """Run one scheduled step; what every sequence it touched gained.

        With async scheduling the step is queued on the GPU and the previous step's tokens are
        read back while it runs, so outputs trail the GPU by one step: a sequence that ends
        (EOS, stop) has computed one token too many, which is dropped.
        """
        if self.tp is None:
            return self._traced_step()
        try:
            with self.tp.guard():  # tensor parallel: a worker that died fails every request
                return self._traced_step()
        except WorkerDiedError:
            self.abort_all()
            raise

    def _traced_step(self) -> list[SeqDelta]:
        if self.trace is not None:
            return self.trace.record(self, self._step)
        return self._step()

    def _speculating(self) -> bool:
        """Whether this step verifies proposals: few enough live sequences, none about to fork
        n / best_of siblings off its first token (a plain step does that) and none held to a
        grammar (verification does not apply its mask)."""
        sched = self.scheduler
        if self.spec is None or not self.spec.active(len(sched.running) + len(sched.waiting)):
            return False
        return not any(
            s.pending_forks or s.params.structured_outputs is not None
            for s in itertools.chain(sched.running, sched.waiting)
        )

    def _schedule(self, num_spec_tokens: int = 0):
        out = self.scheduler.schedule(num_spec_tokens)
        if self.spec is not None:  # the draft's KV pool shares the target's blocks
            self.spec.copy_blocks(out.block_copies)
        return out

    def _step(self) -> list[SeqDelta]:
        if self._compiling:  # nothing else to do: wait a little for a grammar
            idle = not self.scheduler.running and not self.scheduler.waiting
            self._admit_compiled(0.01 if idle and self._inflight is None else 0.0)
        speculate = self._speculating()
        if self.async_scheduling and not self._sync_only and not speculate:
            return self._step_async()
        if self._inflight is not None:  # a request that needs lockstep arrived: drain first
            prev, self._inflight = self._inflight, None
            return self._process(prev.seqs, prev.sample.result())
        out = self._schedule(self.spec.num_spec_tokens if speculate else 0)
        if not out.seqs:
            return []
        if speculate:
            self.spec.propose(out, self.scheduler, self.sampler)
        seqs, sample, logits, prompt_logprobs = self.runner.execute(
            out, None, self.sampler, before_sample=self._update_grammars
        )
        for seq, lps in prompt_logprobs:
            seq.prompt_logprobs.extend(lps)
        if any(out.num_spec_tokens):
            return self._verify(out, seqs, logits)
        self.scheduler.update(out)
        if not seqs:
            return []
        if sample is None:  # first tokens of n / best_of siblings: fork them, then sample
            seqs, rows = self._fork(seqs)
            self._update_grammars(seqs)
            sample = self.sampler.sample(logits[rows], seqs)
        return self._process(seqs, sample.result())

    def _step_async(self) -> list[SeqDelta]:
        out = self._schedule()
        launched = None
        if out.seqs:
            prev = self._inflight.tokens if self._inflight is not None else None
            seqs, sample, *_ = self.runner.execute(
                out, prev, self.sampler, before_sample=self._update_grammars
            )
            self.scheduler.update(out)
            if seqs:
                assert sample is not None, "forks run lockstep"
                for seq in seqs:
                    seq.num_pending += 1
                rows = {seq.seq_id: i for i, seq in enumerate(seqs)}
                launched = InFlight(seqs, sample, PreviousTokens(sample.tokens, rows))
        prev, self._inflight = self._inflight, launched
        if prev is None:
            return []
        return self._process(prev.seqs, prev.sample.result())

    def _update_grammars(self, seqs: list[Sequence]) -> None:
        """Before sampling: every grammar of `seqs` has accepted all of its sequence's
        tokens, the one still in flight from the previous step too (async scheduling: it is
        read here, done on the GPU by now, while this step's forward runs)."""
        if not any(s.grammar is not None for s in seqs):
            return
        pending: dict[int, int] = {}
        if self._inflight is not None:
            result = self._inflight.sample.result()
            pending = {s.seq_id: t for s, t in zip(self._inflight.seqs, result.token_ids)}
        states, tokens = [], []  # each grammar's one token in flight, accepted in one call
        for seq in seqs:
            g = seq.grammar
            if g is None:
                continue
            g.catch_up(seq.output_token_ids)
            if seq.num_pending and g.num_accepted == seq.num_output_tokens:
                states.append(g)
                tokens.append(pending[seq.seq_id])
        accept_tokens(states, tokens)

    def _process(self, seqs: list[Sequence], result) -> list[SeqDelta]:
        """Append the sampled tokens, check token-level stops; the deltas for the caller.
        (The per-sequence work is inline: this loop runs for every sequence every step.)"""
        deltas, ended = [], []
        max_len, finished = self.max_model_len, SequenceStatus.FINISHED
        rows = zip(seqs, result.token_ids, result.logprobs, result.top_logprobs)
        for seq, token, logprob, top in rows:
            if seq.num_pending:
                seq.num_pending -= 1
            if seq.status is finished:  # aborted, or ended while this token was in flight
                continue
            ids = seq.token_ids
            ids.append(token)
            seq.cumulative_logprob += logprob
            n, max_tokens = len(ids), seq.params.max_tokens
            if (
                token in seq.stop_token_set
                or n >= max_len
                or (max_tokens is not None and n - seq.num_prompt_tokens >= max_tokens)
            ):  # it may end here: check_stop_token decides
                check_stop_token(seq, max_len)
                if seq.status is finished:
                    ended.append(seq)
            prompt_logprobs = None
            if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
                prompt_logprobs, seq.prompt_logprobs_sent = seq.prompt_logprobs, True
            deltas.append(
                SeqDelta(
                    seq.request_id,
                    seq.index,
                    [token],
                    None if top is None else [top],
                    seq.cumulative_logprob,
                    seq.finish_reason,
                    seq.stop_reason,
                    prompt_logprobs,
                )
            )
        self.generation_tokens_total += len(deltas)
        self.scheduler.finish_all(ended)
        self._finish_requests([self.requests[seq.request_id] for seq in ended])
        return deltas

    def _finish_requests(self, done: list[CoreRequest]) -> None:
        for req in done:
            if not req.finished and all(s.is_finished for s in req.seqs):
                req.finished = True
                self._remove(req.request_id)

    def _verify(self, out, seqs: list[Sequence], logits) -> list[SeqDelta]:
        """Accept or reject each sequence's proposals; keep the accepted tokens' K/V, append
        them and the token after them (stopping at the first that ends the sequence)."""
        result, kept = self.spec.accept(self.sampler, logits, seqs)
        num_accepted = {seq.seq_id: rows.stop - rows.start - 1 for seq, rows in zip(seqs, kept)}
        self.scheduler.update(out, [num_accepted.get(s.seq_id, 0) for s in out.seqs])
        deltas, done = [], []
        for seq, rows in zip(seqs, kept):
            tokens, tops = [], []
            for r in range(rows.start, rows.stop):
                tokens.append(result.token_ids[r])
                tops.append(result.top_logprobs[r])
                self._append(seq, result.token_ids[r], result.logprobs[r])
                if seq.is_finished:
                    break
            deltas.append(
                SeqDelta(
                    seq.request_id, seq.index, tokens, None if tops[0] is None else tops,
                    seq.cumulative_logprob, seq.finish_reason, seq.stop_reason,
                )
            )  # fmt: skip
            if seq.is_finished:
                done.append(self.requests[seq.request_id])
        self._finish_requests(done)
        return deltas

    def _fork(self, seqs: list[Sequence]):
        """Fork the siblings of sequences sampling their first token (they share its logits)."""
        if not any(s.pending_forks for s in seqs):
            return seqs, None
        all_seqs, rows = [], []
        for j, seq in enumerate(seqs):
            all_seqs.append(seq)
            rows.append(j)
            req = self.requests[seq.request_id]
            for _ in range(seq.pending_forks):
                child = seq.fork(next(self._seq_ids), len(req.seqs))
                self.block_manager.fork(seq, child)
                if seq.params.seed is not None:
                    child.generator = make_generator(seq.params.seed, child.index, self.device)
                self.scheduler.add_running(child)
                req.seqs.append(child)
                all_seqs.append(child)
                rows.append(j)
            seq.pending_forks = 0
        return all_seqs, rows

    def _append(self, seq: Sequence, token: int, logprob: float) -> None:
        seq.token_ids.append(token)
        seq.cumulative_logprob += logprob
        self.generation_tokens_total += 1
        check_stop_token(seq, self.max_model_len)
        if seq.is_finished:
            self.scheduler.finish(seq)

    def stats(self) -> dict:
        bm = self.block_manager
        held = [len(s.block_table) for s in self.scheduler.running]  # KV blocks per sequence
        return {
            "kv_pool_tokens": bm.num_blocks * bm.block_size,
            "kv_blocks_per_seq_mean": sum(held) / len(held) if held else 0.0,
            "kv_blocks_per_seq_max": max(held, default=0),
            "kv_evicted_blocks_total": self.evictor.num_evicted_blocks if self.evictor else 0,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": bm.usage(),
            "num_free_blocks": bm.num_free_blocks,
            "num_total_blocks": bm.num_blocks,
            "prefix_cache_hits": bm.prefix_cache_hits,
            "prefix_cache_queries": bm.prefix_cache_queries,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            **(self.spec.stats.as_dict() if self.spec is not None else {}),
        }


class StepTrace:
    """KILN_STEP_TRACE=DIR: one JSON line per engine step in DIR/steps-PID.jsonl, written at
    exit: the step's host start and end (perf_counter s), the sequences and tokens it
    scheduled, how many of them were decodes, the CUDA graph that ran it (null: eager), the
    queue after it, and the seconds it spent blocked on the GPU for a step's tokens (the
    rest is host work). For finding where a served run loses time against an offline one."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[tuple] = []
        atexit.register(self.write)

    @classmethod
    def from_env(cls) -> StepTrace | None:
        where = os.environ.get("KILN_STEP_TRACE")
        if not where:
            return None
        Path(where).mkdir(parents=True, exist_ok=True)
        return cls(Path(where) / f"steps-{os.getpid()}.jsonl")

    def record(self, core: EngineCore, step):
        start, waited = time.perf_counter(), PendingSample.waited
        runner = core.runner
        runner.last_plan = None
        deltas = step()
        plan = runner.last_plan
        sched = core.scheduler
        end = time.perf_counter()
        row = (start, end, len(deltas), len(sched.running), len(sched.waiting),
               PendingSample.waited - waited)  # fmt: skip
        if plan is not None:
            md = plan.metadata
            decodes = sum(1 for n in md.query_lens if n == 1)  # a mixed graph's too
            row += (md.num_seqs, int(md.positions.shape[0]), decodes, plan.graph)
        self.rows.append(row)
        return deltas

    def write(self) -> None:
        keys = ("start", "end", "deltas", "running", "waiting", "gpu_wait", "seqs", "tokens",
                "decodes", "graph")  # fmt: skip
        with open(self.path, "w") as f:
            for row in self.rows:
                f.write(json.dumps(dict(zip(keys, row))) + "\n")
        self.rows = []


def check_prompt_ids(
    ids: list[int], max_model_len: int, vocab_size: int, param: str = "prompt"
) -> list[int]:
    """The prompt's ids as ints; InputError (naming `param`) for an empty or out-of-vocab
    prompt, ContextLengthError for one that leaves no room to generate."""
    ids = list(map(int, ids))  # (C loops here and in min/max: a prompt is checked per request)
    if not ids:
        raise InputError("empty prompt: give at least one token", param)
    if len(ids) >= max_model_len:
        raise ContextLengthError(
            f"prompt has {len(ids)} tokens but max_model_len is {max_model_len} "
            "(the prompt must leave room for at least one generated token)", param
        )  # fmt: skip
    if min(ids) < 0 or max(ids) >= vocab_size:
        bad = next(t for t in ids if not 0 <= t < vocab_size)
        raise InputError(f"token id {bad} is outside the vocabulary [0, {vocab_size})", param)
    return ids


def check_fits_batch(params: SamplingParams, max_num_seqs: int) -> None:
    """InputError unless all n (best_of) sequences fit in one batch: they are scheduled
    together, so more would wait at the queue head forever."""
    if params.best_of > max_num_seqs:
        name = "best_of" if params.best_of > params.n else "n"
        raise InputError(
            f"{name}={params.best_of} sequences can never run at once: this engine runs at "
            f"most max_num_seqs={max_num_seqs}", name
        )  # fmt: skip


def check_stop_token(seq: Sequence, max_model_len: int) -> None:
    """Finish seq if its newest token ends it: EOS, a stop token id, max_tokens, the context."""
    p, ids = seq.params, seq.token_ids
    token, num_output = ids[-1], len(ids) - seq.num_prompt_tokens
    if num_output >= p.min_tokens:
        if not p.ignore_eos and token in seq.eos_token_ids:
            return seq.finish("stop")
        if token in p.stop_token_ids:
            return seq.finish("stop", token)
    if (p.max_tokens is not None and num_output >= p.max_tokens) or len(ids) >= max_model_len:
        seq.finish("length")
