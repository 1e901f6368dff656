"""OutputProcessor: the core's token-id deltas -> text, stop strings and RequestOutputs.

It runs in the caller's process (the API server's, or kiln.LLM's): it detokenizes each
sequence incrementally, finds stop strings (and says which sequences the core must end), and
builds each request's RequestOutput in the shape its `output_kind` asks for: everything so far
(CUMULATIVE), only what is new (DELTA), or one output at the end (FINAL_ONLY).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from kiln.engine.detokenizer import SeqText
from kiln.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, SeqDelta
from kiln.engine.sampling_params import RequestOutputKind, SamplingParams


class SeqState:
    """One completion as the caller sees it."""

    def __init__(self, index: int, prompt_token_ids: list[int], params: SamplingParams):
        self.index = index
        self.text = SeqText(prompt_token_ids, params.skip_special_tokens)
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.sent_tokens = 0  # delta mode: output tokens already handed out

    @property
    def output_token_ids(self) -> list[int]:
        return self.text.token_ids[self.text.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.text.token_ids) - self.text.num_prompt_tokens


class RequestState:
    def __init__(self, request_id, prompt, prompt_token_ids, params: SamplingParams, arrival):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.num_seqs = params.best_of
        self.seqs: dict[int, SeqState] = {}
        self.metrics = RequestMetrics(arrival_time=arrival)
        self.finished = False
        kind = params.output_kind
        if params.best_of > params.n:
            kind = RequestOutputKind.FINAL_ONLY  # which n survive is known only at the end
        self.kind = kind
        self.changed: set[int] = set()  # delta mode: indexes with something new
        self.num_finished = 0  # sequences with a finish_reason
        self.prompt_logprobs: list[dict[int, float] | None] | None = None
        self.prompt_logprobs_sent = False  # delta mode: handed out once

    def seq(self, index: int) -> SeqState:
        s = self.seqs.get(index)
        if s is None:
            s = self.seqs[index] = SeqState(index, self.prompt_token_ids, self.params)
        return s


@dataclass
class StopRequest:
    """A sequence the core must end: the output processor found a stop string in its text."""

    request_id: str
    index: int
    stop: str


class OutputProcessor:
    """Tracks the live requests of one engine; `process(deltas)` after every core step."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}

    def add_request(self, request_id, prompt, prompt_token_ids, params, arrival=None) -> None:
        arrival = time.monotonic() if arrival is None else arrival
        self.requests[request_id] = RequestState(
            request_id, prompt, prompt_token_ids, params, arrival
        )

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Forget a request; its final output (unfinished sequences end with 'abort')."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for i in range(req.num_seqs):
            s = req.seq(i)
            if s.finish_reason is None:
                s.finish_reason = "abort"
                req.changed.add(i)
        return self._finish(req, time.monotonic())

    def process(self, deltas: list[SeqDelta]) -> tuple[list[RequestOutput], list[StopRequest]]:
        """Apply one step's deltas: the outputs to hand out, the sequences to stop."""
        now = time.monotonic()
        touched: dict[str, RequestState] = {}
        stops: list[StopRequest] = []
        for d in deltas:
            req = self.requests.get(d.request_id)
            if req is None:  # aborted here while the core was still running it
                continue
            s = req.seq(d.index)
            if d.prompt_logprobs is not None:
                req.prompt_logprobs = d.prompt_logprobs
            if s.finish_reason is not None:  # stopped here; the core has not heard yet
                continue
            stop = self._append(req, s, d)
            if stop is not None:
                s.finish_reason, s.stop_reason = "stop", stop
                stops.append(StopRequest(req.request_id, d.index, stop))
                req.num_finished += 1
            elif d.finish_reason is not None:
                s.finish_reason, s.stop_reason = d.finish_reason, d.stop_reason
                req.num_finished += 1
            req.changed.add(d.index)
            touched[req.request_id] = req
        outputs = []
        for req in touched.values():
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            if req.num_finished == req.num_seqs:  # every sequence has finished
                del self.requests[req.request_id]
                outputs.append(self._finish(req, now))
            elif req.kind != RequestOutputKind.FINAL_ONLY:
                outputs.append(self._output(req))
        return outputs, stops

    def _append(self, req: RequestState, s: SeqState, d: SeqDelta) -> str | None:
        """Add a delta's tokens to one sequence; the stop string they complete, if any."""
        p, text = req.params, s.text
        s.cumulative_logprob = d.cumulative_logprob
        for k, token in enumerate(d.new_token_ids):
            new_text = text.append(self.tokenizer, token)
            if s.logprobs is not None and d.new_logprobs is not None:
                s.logprobs.append(d.new_logprobs[k])
            if new_text and p.stop and s.num_output_tokens >= p.min_tokens:
                stop = s.text.find_stop(p.stop, new_text)
                if stop is not None:
                    return stop
        return None

    def _finish(self, req: RequestState, now: float) -> RequestOutput:
        req.finished = True
        req.metrics.finished_time = now
        if len(req.seqs) > req.params.n:  # best_of: keep the n most likely
            ranked = sorted(req.seqs.values(), key=lambda s: -s.cumulative_logprob)
            req.seqs = {i: s for i, s in enumerate(ranked[: req.params.n])}
            for i, s in req.seqs.items():
                s.index = i
            req.changed = set(req.seqs)
        return self._output(req)

    def _output(self, req: RequestState) -> RequestOutput:
        stops = req.params.stop
        if req.kind == RequestOutputKind.DELTA:
            changed = sorted(req.changed) if len(req.changed) > 1 else req.changed
            outs = [self._delta(req.seqs[i], stops, req.finished) for i in changed]
        else:
            outs = [
                CompletionOutput(
                    index=s.index,
                    text=s.text.text[: s.text.visible_len(stops, s.finish_reason is not None)],
                    token_ids=s.output_token_ids,
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                    logprobs=list(s.logprobs) if s.logprobs is not None else None,
                    cumulative_logprob=s.cumulative_logprob,
                )
                for _, s in sorted(req.seqs.items())
            ]
        req.changed = set()
        prompt_logprobs = req.prompt_logprobs
        if req.kind == RequestOutputKind.DELTA:
            if req.prompt_logprobs_sent:
                prompt_logprobs = None
            req.prompt_logprobs_sent |= prompt_logprobs is not None
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs,
                             req.finished, req.metrics, prompt_logprobs)  # fmt: skip

    @staticmethod
    def _delta(s: SeqState, stops: list[str], finished: bool) -> CompletionOutput:
        """What one sequence gained since it was last handed out."""
        ids = s.text.token_ids
        start = s.text.num_prompt_tokens + s.sent_tokens
        new_ids = ids[start:]
        logprobs = None if s.logprobs is None else s.logprobs[s.sent_tokens :]
        s.sent_tokens += len(new_ids)
        text = s.text.take(s.text.visible_len(stops, s.finish_reason is not None or finished))
        return CompletionOutput(
            index=s.index,
            text=text,
            token_ids=new_ids,
            finish_reason=s.finish_reason,
            stop_reason=s.stop_reason,
            logprobs=logprobs,
            cumulative_logprob=s.cumulative_logprob,
        )
