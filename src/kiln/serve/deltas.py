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
    logprobs: list[dict[int, float] | None] | None  # None entries: echoed prompt token 0
    finish_reason: str | None
    stop_reason: int | str | None
    prompt_logprobs: list[dict[int, float] | None] | None = None  # on a choice's first delta


@dataclass
class Echo:
    """/v1/completions' `echo`: each choice starts with its prompt (text, ids and, with
    logprobs, the prompt's logprobs); `generate=False` (max_tokens 0): and is only that."""

    texts: list[str]  # per prompt
    ids: list[list[int]]
    generate: bool = True


@dataclass
class DeltaTracker:
    """Numbers the engine's delta outputs as OpenAI choices (prompt i, completion j ->
    i * n + j), counts usage, and puts the prompt in front of each choice when echoing."""

    n: int
    prompt_tokens: list[int]  # per prompt
    echo: Echo | None = None
    sent_tokens: dict[int, int] = field(default_factory=dict)
    prompt_logprobs: dict[int, list] = field(default_factory=dict)  # per prompt, once known

    def deltas(self, prompt_index: int, out) -> list[Delta]:
        """The choices' deltas in a DELTA (or FINAL_ONLY) RequestOutput."""
        if out.prompt_logprobs is not None:
            self.prompt_logprobs[prompt_index] = out.prompt_logprobs
        found = []
        for c in out.outputs:
            index = prompt_index * self.n + c.index
            d = Delta(index, c.text, c.token_ids, c.logprobs, c.finish_reason, c.stop_reason)
            if self.echo is not None and not self.echo.generate:  # the token is not asked for
                d = Delta(index, "", [], [] if c.logprobs is not None else None,
                          c.finish_reason and "length", None)  # fmt: skip
            first = index not in self.sent_tokens
            self.sent_tokens[index] = self.sent_tokens.get(index, 0) + len(d.token_ids)
            if first:
                d.prompt_logprobs = self.prompt_logprobs.get(prompt_index)
                if self.echo is not None:
                    self._prepend_prompt(d, prompt_index)
            if not d.text and not d.token_ids and not d.finish_reason:
                continue
            found.append(d)
        return found

    def _prepend_prompt(self, d: Delta, prompt_index: int) -> None:
        d.text = self.echo.texts[prompt_index] + d.text
        d.token_ids = self.echo.ids[prompt_index] + d.token_ids
        if d.logprobs is not None:
            assert d.prompt_logprobs is not None, "echo with logprobs asks for prompt_logprobs"
            d.logprobs = d.prompt_logprobs + d.logprobs

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
        result.text_offset.append(offset)
        offset += len(text)
        result.tokens.append(text)
        if lp is None:  # an echoed prompt's first token: nothing predicted it
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            continue
        top = {decode(t): v for t, v in _sorted_top(lp, num)}
        top.setdefault(text, finite(lp.get(tid, float("-inf"))))
        result.token_logprobs.append(finite(lp.get(tid)))
        result.top_logprobs.append(top)
    return result


def vllm_prompt_logprobs(
    decode: Callable[[int], str], ids: list[int], lps: list, num: int
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {id: {logprob,
    decoded_token}} holding the token itself and the top `num`."""
    out: list[dict[str, dict[str, Any]] | None] = []
    for tid, lp in zip(ids, lps):
        if lp is None:
            out.append(None)
            continue
        keep = dict(_sorted_top(lp, num))
        keep.setdefault(tid, finite(lp[tid]))
        out.append({str(t): {"logprob": v, "decoded_token": decode(t)} for t, v in keep.items()})
    return out


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
