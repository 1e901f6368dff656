"""What the engine hands back: the core's per-step SeqDelta, and vLLM's RequestOutput /
CompletionOutput shapes built from them."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec


@dataclass
class CompletionOutput:
    """One of a request's `n` completions; text and token_ids are cumulative."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None (still running)
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """time.monotonic() timestamps of one request's life."""

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    """A request's state after a step: its prompt and its completions so far."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    metrics: RequestMetrics | None = None
    # vLLM's: per prompt token its logprob and the top prompt_logprobs (None for the first)
    prompt_logprobs: list[dict[int, float] | None] | None = None


@dataclass
class EmbeddingOutput:
    embedding: list[float]


@dataclass
class EmbeddingRequestOutput:
    """vLLM's: one prompt's embedding (kiln.LLM.embed)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True


class SeqDelta(msgspec.Struct, array_like=True, omit_defaults=True):
    """What one sequence gained in a step (vLLM's EngineCoreOutput)."""

    request_id: str
    index: int  # which of the request's completions
    new_token_ids: list[int]
    new_logprobs: list[dict[int, float]] | None = None  # top-N per new token, when asked
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None  # with the first token
