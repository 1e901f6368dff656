"""SamplingParams: how one request is decoded, with vLLM's field names and defaults."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kiln.engine.structured import StructuredOutputsParams
from kiln.errors import InputError

MAX_LOGPROBS = 20  # top-N logprobs a request may ask for (the server's limit too)


GREEDY_BELOW = 1e-5  # a temperature below this is greedy (argmax)


class RequestOutputKind(enum.IntEnum):
    """What each RequestOutput of a running request carries (vLLM's names)."""

    CUMULATIVE = 0  # everything so far: text, token_ids, logprobs from the first token
    DELTA = 1  # only what is new since the previous output
    FINAL_ONLY = 2  # nothing until the request finishes, then everything


@dataclass
class SamplingParams:
    """Decoding settings of one request; `__post_init__` rejects values out of range."""

    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = field(default_factory=list)
    stop_token_ids: list[int] | None = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # top-N logprobs of each prompt token (vLLM's)
    use_beam_search: bool = False
    length_penalty: float = 1.0
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None  # a grammar the output matches
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.output_kind = RequestOutputKind(self.output_kind)
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.top_k == -1:
            self.top_k = 0
        if self.best_of is None:
            self.best_of = self.n
        _check(self.n >= 1, "n", self.n, ">= 1")
        _check(self.best_of >= self.n, "best_of", self.best_of, f">= n ({self.n})")
        _check(self.temperature >= 0, "temperature", self.temperature, ">= 0")
        _check(0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        _check(self.top_k >= 0, "top_k", self.top_k, ">= 1, or 0 / -1 to disable")
        _check(0 <= self.min_p <= 1, "min_p", self.min_p, "in [0, 1]")
        _check(self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty, "> 0")
        _check(
            -2 <= self.presence_penalty <= 2, "presence_penalty", self.presence_penalty, "[-2, 2]"
        )
        _check(
            -2 <= self.frequency_penalty <= 2,
            "frequency_penalty",
            self.frequency_penalty,
            "[-2, 2]",
        )
        if self.max_tokens is not None:
            _check(self.max_tokens >= 1, "max_tokens", self.max_tokens, ">= 1")
            _check(
                0 <= self.min_tokens <= self.max_tokens,
                "min_tokens",
                self.min_tokens,
                f"in [0, max_tokens={self.max_tokens}]",
            )
        else:
            _check(self.min_tokens >= 0, "min_tokens", self.min_tokens, ">= 0")
        if self.logprobs is not None:
            _check(0 <= self.logprobs <= MAX_LOGPROBS, "logprobs", self.logprobs,
                   f"in [0, {MAX_LOGPROBS}]")  # fmt: skip
        if self.prompt_logprobs is not None:
            _check(0 <= self.prompt_logprobs <= MAX_LOGPROBS, "prompt_logprobs",
                   self.prompt_logprobs, f"in [0, {MAX_LOGPROBS}]")  # fmt: skip
            _check(not self.use_beam_search, "prompt_logprobs", self.prompt_logprobs,
                   "None with use_beam_search")  # fmt: skip
        _check(self.structured_outputs is None or not self.use_beam_search,
               "structured_outputs", "...", "None with use_beam_search")  # fmt: skip
        _check(
            self.length_penalty > 0 or not self.use_beam_search,
            "length_penalty",
            self.length_penalty,
            "> 0",
        )
        if self.use_beam_search:  # the beam width is best_of, which is n unless given
            width = "best_of" if self.best_of > self.n else "n"
            _check(self.best_of > 1, width, self.best_of, "> 1 with use_beam_search")
            _check(self.best_of <= MAX_LOGPROBS // 2, width, self.best_of,
                   f"<= {MAX_LOGPROBS // 2} with use_beam_search (a beam step reads the top "
                   "2 * width logprobs)")  # fmt: skip
            _check(self.temperature == 0, "temperature", self.temperature, "0 with use_beam_search")
        for s in self.stop:
            _check(isinstance(s, str) and s != "", "stop", s, "non-empty strings")
        # Whether tokens are drawn on temperature alone: no top-k / top-p / min-p, penalties
        # or top-N logprobs (the fused sampling kernel's terms). Read every step, so kept; set
        # here, not by a cached_property: an attribute added to the instance's __dict__ after
        # __init__ makes every attribute read on it ~4x slower in CPython 3.11.
        self.temperature_only = not (
            self.top_k > 0
            or self.top_p < 1.0
            or self.min_p > 0
            or self.has_penalties
            or self.logprobs is not None
        )

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise InputError(f"invalid sampling parameter {name}={value!r}: must be {allowed}", name)
