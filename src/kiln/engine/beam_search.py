"""Beam search as a client of the engine (as vLLM v1 does): the engine knows nothing of beams.

Each beam step asks the engine for one ordinary request per live beam (the prompt + the beam's
tokens, max_tokens=1, greedy, logprobs=2 * width) and reads the top logprobs of the one token
each gets back; the prefix cache makes re-submitting the growing beams cheap. The candidates of
every beam are ranked by cumulative logprob: EOS candidates retire as finished hypotheses, the
best `width` others become the next beams. The search ends at max_tokens (or the context), or
when no beam is left; hypotheses are ranked by cum_logprob / len ** length_penalty and the best
n returned, detokenized like any output.

`BeamSearch` is one search and does no I/O, so that kiln.LLM (stepping its engine in-process)
and AsyncLLM (awaiting the engine-core process) drive it the same way:

    search = BeamSearch(prompt_token_ids, params, eos_token_ids, max_model_len)
    while not search.finished:
        search.advance(<the final RequestOutput of each (id, prompt) of
                        search.step_requests(request_id), run with search.step_params>)
    search.output(tokenizer, request_id, prompt)
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field, replace

from kiln.engine.output_processor import OutputProcessor
from kiln.engine.outputs import RequestOutput, SeqDelta
from kiln.engine.sampling_params import RequestOutputKind, SamplingParams


@dataclass
class Beam:
    tokens: list[int] = field(default_factory=list)
    logprob: float = 0.0
    finished: bool = False

    def score(self, length_penalty: float) -> float:
        return self.logprob / max(len(self.tokens), 1) ** length_penalty


class BeamSearch:
    """The beams and finished hypotheses of one request with `use_beam_search`."""

    def __init__(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: Collection[int],
        max_model_len: int,
    ):
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.width = params.best_of
        room = max_model_len - len(prompt_token_ids)
        self.max_tokens = min(params.max_tokens or room, room)
        # what each beam step asks of the engine: the top 2 * width next tokens of one beam
        self.step_params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            logprobs=2 * self.width,
            ignore_eos=True,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        self.beams = [Beam()]
        self.done: list[Beam] = []
        self.num_steps = 0
        self.arrival = time.monotonic()

    @property
    def finished(self) -> bool:
        return self.num_steps >= self.max_tokens or not self.beams

    def step_requests(self, request_id: str) -> list[tuple[str, list[int]]]:
        """The next step's engine requests, one per live beam: (request id, prompt ids)."""
        return [
            (f"{request_id}#beam{self.num_steps}.{k}", self.prompt_token_ids + beam.tokens)
            for k, beam in enumerate(self.beams)
        ]

    def advance(self, outputs: list[RequestOutput]) -> None:
        """Take the step's outputs (one per step request, in order); pick the next beams."""
        candidates = []
        for beam, out in zip(self.beams, outputs, strict=True):
            (top,) = out.outputs[0].logprobs
            for token, lp in top.items():
                candidates.append(Beam(beam.tokens + [token], beam.logprob + lp))
        candidates.sort(key=lambda b: -b.logprob)
        self.beams = []
        for cand in candidates:
            if not self.params.ignore_eos and cand.tokens[-1] in self.eos_token_ids:
                cand.finished = True
                self.done.append(cand)
            elif len(self.beams) < self.width:
                self.beams.append(cand)
        self.num_steps += 1

    def output(self, tokenizer, request_id: str, prompt: str | None) -> RequestOutput:
        """The best n hypotheses as the request's one, finished, output (detokenized, stop
        strings applied)."""
        length_penalty = self.params.length_penalty
        ranked = sorted(self.done + self.beams, key=lambda b: -b.score(length_penalty))
        best = ranked[: self.params.n]
        deltas = [
            SeqDelta(
                request_id,
                i,
                b.tokens,
                cumulative_logprob=b.logprob,
                finish_reason="stop" if b.finished else "length",
            )
            for i, b in enumerate(best)
        ]
        # to the output processor these are len(best) finished samples
        params = replace(self.params, n=len(best), best_of=len(best), use_beam_search=False)
        processor = OutputProcessor(tokenizer)
        processor.add_request(request_id, prompt, self.prompt_token_ids, params, self.arrival)
        (out,), _ = processor.process(deltas)
        return out
