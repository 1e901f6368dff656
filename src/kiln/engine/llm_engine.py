"""LLMEngine: the synchronous core that LLM (offline) and AsyncLLM (the server's) both drive.

add_request -> Sequence in the scheduler's queue; step() = schedule, run the model, sample,
append, detokenize, check stops, free the finished; outputs come back as RequestOutput.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

from kiln.config import ModelConfig
from kiln.engine.block_manager import BlockManager
from kiln.engine.config import EngineConfig
from kiln.engine.detokenizer import check_stop, detokenize_incrementally, init_offsets, visible_text
from kiln.engine.model_runner import ModelRunner, PreviousTokens
from kiln.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from kiln.engine.sampler import PendingSample, Sampler, make_generator
from kiln.engine.sampling_params import SamplingParams
from kiln.engine.scheduler import Scheduler
from kiln.engine.sequence import Sequence
from kiln.errors import ConfigError, InputError, TokenizerError


@dataclass
class InFlight:
    """A step queued on the device whose sampled tokens the host has not read yet."""

    seqs: list[Sequence]
    sample: PendingSample
    tokens: PreviousTokens


class Request:
    """One request: its prompt, its settings and its (n or best_of) sequences."""

    def __init__(self, request_id, prompt, prompt_token_ids, params: SamplingParams):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.seqs: list[Sequence] = []
        self.metrics = RequestMetrics(arrival_time=time.monotonic())
        self.finished = False
        self.is_beam = False
        self.internal = False  # a beam-search step: its output goes to the beam, not the caller

    def output(self) -> RequestOutput:
        seqs = self.seqs
        if self.finished and len(seqs) > self.params.n:  # best_of: keep the n most likely
            seqs = sorted(seqs, key=lambda s: -s.cumulative_logprob)[: self.params.n]
        outs = [
            CompletionOutput(
                index=i if self.finished else s.index,
                text=visible_text(s),
                token_ids=s.output_token_ids,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                cumulative_logprob=s.cumulative_logprob,
            )
            for i, s in enumerate(seqs)
        ]
        return RequestOutput(
            self.request_id, self.prompt, self.prompt_token_ids, outs, self.finished, self.metrics
        )


def eos_ids_from_dir(path: Path, config: ModelConfig) -> set[int]:
    """EOS ids from generation_config.json and config.json (for a model with no tokenizer)."""
    ids: set[int] = set()
    gen = path / "generation_config.json"
    values = [config.eos_token_id]
    if gen.is_file():
        values.append(json.loads(gen.read_text()).get("eos_token_id"))
    for v in values:
        ids |= set(v) if isinstance(v, list) else {v} if v is not None else set()
    return ids


class LLMEngine:
    def __init__(self, model: str, dtype=None, device=None, tokenizer=None, **engine_args):
        from kiln.model.loader import load_model
        from kiln.tokenizer.hf import load_tokenizer

        self.config = EngineConfig.from_kwargs(engine_args)
        path = Path(model)
        self.model_config = ModelConfig.from_dir(path)
        if tokenizer is None:
            try:
                tokenizer = load_tokenizer(path)
            except TokenizerError:
                tokenizer = None  # token ids in, token ids out
        self.tokenizer = tokenizer
        context = self.model_config.max_position_embeddings
        self.max_model_len = self.config.max_model_len or context
        if self.max_model_len > context:
            raise ConfigError(
                f"max_model_len={self.max_model_len} exceeds the model's context of {context}"
            )
        cfg = self.config
        if not cfg.enable_chunked_prefill and cfg.max_num_batched_tokens < self.max_model_len:
            raise ConfigError(
                f"max_num_batched_tokens={cfg.max_num_batched_tokens} < max_model_len="
                f"{self.max_model_len} needs enable_chunked_prefill=True"
            )
        self.eos_token_ids = frozenset(
            tokenizer.eos_token_ids if tokenizer else eos_ids_from_dir(path, self.model_config)
        )
        net = load_model(path, dtype=dtype, device=device)
        self.runner = ModelRunner(net, cfg, self.max_model_len)
        self.device = self.runner.device
        self.block_manager = BlockManager(
            self.runner.num_blocks, cfg.block_size, cfg.enable_prefix_caching
        )
        self.scheduler = Scheduler(cfg, self.block_manager, self.max_model_len)
        self.sampler = Sampler(self.model_config.vocab_size, self.runner.ops)
        if self.device.type == "cuda" and self.runner.ops.name == "triton":
            self.sampler.compile_kernels(self.runner.dtype, self.device)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        # Async scheduling: queue step N+1 on the GPU before reading step N's tokens.
        self.async_scheduling = (
            cfg.async_scheduling if cfg.async_scheduling is not None else self.device.type == "cuda"
        )
        self._inflight: InFlight | None = None
        self._sync_only: set[str] = set()  # live requests that need lockstep steps

    # ------------------------------------------------------------------ requests

    def validate_prompt(self, prompt: str | None, prompt_token_ids: list[int] | None) -> list[int]:
        """The prompt's token ids; InputError for an empty, too long or out-of-vocab prompt."""
        if prompt_token_ids is None:
            if prompt is None:
                raise InputError("give a prompt or prompt_token_ids")
            if self.tokenizer is None:
                raise InputError("this model has no tokenizer: give prompt_token_ids")
            prompt_token_ids = self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt_token_ids]
        if not ids:
            raise InputError("empty prompt: give at least one token")
        if len(ids) >= self.max_model_len:
            raise InputError(
                f"prompt has {len(ids)} tokens but max_model_len is {self.max_model_len} "
                "(the prompt must leave room for at least one generated token)"
            )
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        return ids

    def add_request(
        self,
        request_id: str,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> None:
        params = params or SamplingParams()
        if request_id in self.requests:
            raise InputError(f"request id {request_id!r} is already in use")
        ids = self.validate_prompt(prompt, prompt_token_ids)
        if params.stop and self.tokenizer is None:
            raise InputError("stop strings need a tokenizer; this model has none")
        if params.use_beam_search:
            from kiln.engine.beam_search import BeamSearchRequest

            self.requests[request_id] = BeamSearchRequest(self, request_id, prompt, ids, params)
            self._sync_only.add(request_id)
            return
        self.add_validated(request_id, prompt, ids, params)

    def add_validated(self, request_id, prompt, ids, params, internal=False) -> Request:
        """Queue a request whose prompt is already checked."""
        req = Request(request_id, prompt, ids, params)
        req.internal = internal
        seq = Sequence(next(self._seq_ids), request_id, 0, ids, params, self.eos_token_ids)
        init_offsets(seq)
        seq.pending_forks = params.best_of - 1
        if params.seed is not None:
            seq.generator = make_generator(params.seed, 0, self.device)
        req.seqs.append(seq)
        self.requests[request_id] = req
        if params.has_penalties or params.best_of > 1:
            self._sync_only.add(request_id)  # penalties read the newest tokens; forks share them
        self.scheduler.add(seq)
        self.prompt_tokens_total += len(ids)
        return req

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; its final output (finish_reason 'abort')."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        self._remove(request_id)
        if req.is_beam:
            return req.abort()
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish("abort")
                self.scheduler.finish(seq)
        req.finished = True
        req.metrics.finished_time = time.monotonic()
        return req.output()

    def _remove(self, request_id: str) -> None:
        del self.requests[request_id]
        self._sync_only.discard(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ one step

    def step(self, stream: bool = True) -> list[RequestOutput]:
        """Run one scheduled step; outputs of the requests it changed (only finished ones
        unless `stream`).

        With async scheduling the step is queued on the GPU and the previous step's tokens are
        read back while it runs, so outputs trail the GPU by one step: a sequence that ends
        (EOS, stop) has computed one token too many, which is dropped.
        """
        if self.async_scheduling and not self._sync_only:
            return self._step_async(stream)
        if self._inflight is not None:  # a request that needs lockstep arrived: drain first
            prev, self._inflight = self._inflight, None
            return self._process(prev.seqs, prev.sample.result(), stream)
        out = self.scheduler.schedule()
        if not out.seqs:
            return self._drive_beams([])
        seqs, sample, logits = self.runner.execute(out, None, self.sampler)
        self.scheduler.update(out)
        if not seqs:
            return self._drive_beams([])
        if sample is None:  # first tokens of n / best_of siblings: fork them, then sample
            seqs, rows = self._fork(seqs)
            sample = self.sampler.sample(logits[rows], seqs)
        return self._drive_beams(self._process(seqs, sample.result(), stream))

    def _step_async(self, stream: bool) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        launched = None
        if out.seqs:
            prev = self._inflight.tokens if self._inflight is not None else None
            seqs, sample, _ = self.runner.execute(out, prev, self.sampler)
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
        return self._process(prev.seqs, prev.sample.result(), stream)

    def _process(self, seqs: list[Sequence], result, stream: bool) -> list[RequestOutput]:
        """Append the sampled tokens, detokenize, check stops; the changed requests' outputs."""
        now = time.monotonic()
        touched: dict[str, Request] = {}
        for i, seq in enumerate(seqs):
            if seq.num_pending:
                seq.num_pending -= 1
            if seq.is_finished:  # aborted, or ended while this token was in flight
                continue
            self._append(seq, result.token_ids[i], result.logprobs[i], result.top_logprobs[i])
            touched[seq.request_id] = self.requests[seq.request_id]
        outputs = []
        for req in touched.values():
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            if all(s.is_finished for s in req.seqs):
                req.finished = True
                req.metrics.finished_time = now
                self._remove(req.request_id)
            if (stream or req.finished) and not req.internal:
                outputs.append(req.output())
        return outputs

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

    def _append(self, seq: Sequence, token: int, logprob: float, top) -> None:
        seq.token_ids.append(token)
        seq.cumulative_logprob += logprob
        if seq.logprobs is not None:
            seq.logprobs.append(top)
        self.generation_tokens_total += 1
        new_text = detokenize_incrementally(self.tokenizer, seq) if self.tokenizer else ""
        check_stop(seq, new_text, self.max_model_len)
        if seq.is_finished:
            self.scheduler.finish(seq)

    def _drive_beams(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        for req in list(self.requests.values()):
            if req.is_beam:
                out = req.advance()
                if out is not None:
                    outputs.append(out)
                    if out.finished:
                        self._remove(req.request_id)
        return outputs

    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": bm.usage(),
            "num_free_blocks": bm.num_free_blocks,
            "num_total_blocks": bm.num_blocks,
            "prefix_cache_hits": bm.prefix_cache_hits,
            "prefix_cache_queries": bm.prefix_cache_queries,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
        }
