"""Beam search as its own path, on top of the engine (as vLLM v1 does).

Each beam step queues one internal request per live beam (prompt + the beam's tokens,
max_tokens=1, top-2w logprobs); prefix caching makes the shared prefixes cheap. When all of a
step's requests are back, the 2w candidates of every beam are ranked by cumulative logprob,
EOS candidates retire as finished hypotheses, and the best w others become the next beams.
At the end hypotheses are ranked by cum_logprob / len ** length_penalty.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.engine.outputs import SeqDelta
from kiln.engine.sampling_params import SamplingParams


@dataclass
class Beam:
    tokens: list[int] = field(default_factory=list)
    logprob: float = 0.0
    finished: bool = False

    def score(self, length_penalty: float) -> float:
        return self.logprob / max(len(self.tokens), 1) ** length_penalty


class BeamSearchRequest:
    is_beam = True
    internal = False

    def __init__(self, engine, request_id: str, prompt_token_ids, params: SamplingParams):
        self.engine = engine
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.width = params.best_of
        self.beams = [Beam()]
        self.done: list[Beam] = []
        self.step = 0
        self.finished = False
        self.subs = []
        self._launch()

    def _launch(self) -> None:
        step_params = SamplingParams(
            max_tokens=1, temperature=0.0, logprobs=2 * self.width, ignore_eos=True
        )
        self.subs = [
            self.engine.add_validated(
                f"{self.request_id}#beam{self.step}.{k}",
                self.prompt_token_ids + beam.tokens,
                step_params,
                internal=True,
            )  # fmt: skip
            for k, beam in enumerate(self.beams)
        ]

    def advance(self) -> list[SeqDelta] | None:
        """After an engine step: start the next beam step once this one is back; the final
        hypotheses (one delta each, all their tokens) once the search ends."""
        if not all(sub.finished for sub in self.subs):
            return None
        candidates = []
        for beam, sub in zip(self.beams, self.subs):
            for token, lp in sub.top_logprobs.items():
                candidates.append(Beam(beam.tokens + [token], beam.logprob + lp))
        candidates.sort(key=lambda b: -b.logprob)
        eos = self.engine.eos_token_ids
        self.beams = []
        for cand in candidates:
            if not self.params.ignore_eos and cand.tokens[-1] in eos:
                cand.finished = True
                self.done.append(cand)
            elif len(self.beams) < self.width:
                self.beams.append(cand)
        self.step += 1
        room = self.engine.max_model_len - len(self.prompt_token_ids)
        if self.step >= min(self.params.max_tokens or room, room) or not self.beams:
            return self._finish()
        self._launch()
        return None

    def _finish(self) -> list[SeqDelta]:
        self.finished = True
        ranked = sorted(self.done + self.beams, key=lambda b: -b.score(self.params.length_penalty))
        return [
            SeqDelta(
                self.request_id,
                i,
                b.tokens,
                cumulative_logprob=b.logprob,
                finish_reason="stop" if b.finished else "length",
            )
            for i, b in enumerate(ranked[: self.params.n])
        ]

    def abort(self) -> None:
        for sub in self.subs:
            self.engine.abort(sub.request_id)
        self.finished = True
