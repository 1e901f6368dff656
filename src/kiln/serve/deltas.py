"""The engine's delta outputs as OpenAI choices, and token logprobs in OpenAI's two
shapes (the legacy completions object and chat's content list)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kiln.serve.protocol import (
    ChatLogprobs,
    CompletionLogprobs,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
)


@dataclass
class Delta:
    """What one choice gained since it was last reported."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    stop_reason: int | str | None


@dataclass
class DeltaTracker:
    """Numbers the engine's delta outputs as OpenAI choices (prompt i, completion j ->
    i * n + j) and counts usage."""

    n: int
    prompt_tokens: list[int]  # per prompt
    sent_tokens: dict[int, int] = field(default_factory=dict)

    def deltas(self, prompt_index: int, out) -> list[Delta]:
        """The choices' deltas in a DELTA (or FINAL_ONLY) RequestOutput."""
        found = []
        for c in out.outputs:
            index = prompt_index * self.n + c.index
            self.sent_tokens[index] = self.sent_tokens.get(index, 0) + len(c.token_ids)
            if not c.text and not c.token_ids and not c.finish_reason:
                continue
            found.append(
                Delta(index, c.text, c.token_ids, c.logprobs, c.finish_reason, c.stop_reason)
            )
        return found

    def usage(self) -> UsageInfo:
        prompt = sum(self.prompt_tokens)
        completion = sum(self.sent_tokens.values())
        return UsageInfo(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )


LOGPROB_FLOOR = -9999.0  # what -inf / NaN logprobs become: JSON has neither


def finite(value: float | None) -> float | None:
    """A logprob JSON can carry: -inf and NaN become LOGPROB_FLOOR."""
    if value is None:
        return None
    return value if math.isfinite(value) else (0.0 if value > 0 else LOGPROB_FLOOR)


def _sorted_top(lp: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(((t, finite(v)) for t, v in lp.items()), key=lambda kv: -kv[1])[:k]


def completion_logprobs(
    decode: Callable[[int], str], d: Delta, num: int, offset: int
) -> CompletionLogprobs:
    """OpenAI's legacy logprobs: tokens, their logprobs, the top `num`, text offsets."""
    result = CompletionLogprobs()
    for tid, lp in zip(d.token_ids, d.logprobs or []):
        text = decode(tid)
        top = {decode(t): v for t, v in _sorted_top(lp, num)}
        top.setdefault(text, finite(lp.get(tid, float("-inf"))))
        result.tokens.append(text)
        result.token_logprobs.append(finite(lp.get(tid)))
        result.top_logprobs.append(top)
        result.text_offset.append(offset)
        offset += len(text)
    return result


def chat_logprobs(decode: Callable[[int], str], d: Delta, num: int) -> ChatLogprobs:
    """Chat logprobs: each token with its bytes and the top `num` alternatives."""

    def entry(tid: int, value: float) -> dict[str, Any]:
        text = decode(tid)
        return dict(token=text, logprob=finite(value), bytes=list(text.encode()))

    content = [
        TokenLogprob(
            **entry(tid, lp.get(tid, float("-inf"))),
            top_logprobs=[TopLogprob(**entry(t, v)) for t, v in _sorted_top(lp, num)],
        )
        for tid, lp in zip(d.token_ids, d.logprobs or [])
    ]
    return ChatLogprobs(content=content)


def token_decoder(tokenizer) -> Callable[[int], str]:
    return lambda tid: tokenizer.decode([tid], skip_special_tokens=False)
