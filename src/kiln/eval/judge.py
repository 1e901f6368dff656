"""LLM-as-judge, pairwise: a judge model (any OpenAI-compatible chat endpoint) compares two
models' answers to each prompt. Every pair is judged twice, the answers in both orders, and the
two verdicts are averaged, so a judge that favours a position cancels out: one that always picks
"Answer 1" gives each pair 1/2. A's win rate is the mean per-prompt score (win 1, tie or split
1/2, loss 0) with a 95% confidence interval from the normal approximation (the prompts are the
samples)."""

from __future__ import annotations

import math
import os
import re

from tqdm import tqdm

from kiln.eval.backends import post

TEMPLATE = """You are comparing two answers to the same prompt. Judge which answer is better: \
more accurate, more helpful, better written.

[Prompt]
{prompt}

[Answer 1]
{first}

[Answer 2]
{second}

Reply with exactly one of: 1, 2, tie."""


def verdict(text: str) -> float | None:
    """1.0 if the judge picked answer 1, 0.0 for answer 2, 0.5 for a tie; None if unreadable."""
    m = re.search(r"\b(1|2|tie)\b", text.lower())
    return None if m is None else {"1": 1.0, "2": 0.0, "tie": 0.5}[m.group(1)]


class Judge:
    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None):
        self.base = base_url.rstrip("/").removesuffix("/v1")
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY")
        if model is None:
            cards = post(f"{self.base}/v1/models", api_key=api_key).get("data") or []
            model = cards[0]["id"] if cards else "judge"
        self.model = model

    def prefers_first(self, prompt: str, first: str, second: str) -> float | None:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": TEMPLATE.format(prompt=prompt, first=first,
                                                                     second=second)}],
            "temperature": 0,
            "max_tokens": 8,
        }  # fmt: skip
        r = post(f"{self.base}/v1/chat/completions", body, self.api_key)
        return verdict(r["choices"][0]["message"]["content"] or "")


def win_rate(scores: list[float], z: float = 1.96) -> tuple[float, float, float]:
    """Mean and its normal-approximation confidence interval, clipped to [0, 1]."""
    n = len(scores)
    mean = sum(scores) / n
    var = sum((s - mean) ** 2 for s in scores) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(var / n)
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def run_judge(judge: Judge, prompts: list[str], answers_a: list[str], answers_b: list[str],
              progress=True) -> dict:  # fmt: skip
    """A's win rate over B: {"win_rate", "ci_low", "ci_high", "wins", "ties", "losses",
    "inconsistent" (pairs whose two verdicts disagree once swapped), "unparsed", "examples"}."""
    scores, wins, ties, losses, inconsistent, unparsed = [], 0, 0, 0, 0, 0
    for p, a, b in tqdm(list(zip(prompts, answers_a, answers_b)), desc="judge", unit="pair",
                        disable=not progress):  # fmt: skip
        ab = judge.prefers_first(p, a, b)  # A first: 1 is A
        ba = judge.prefers_first(p, b, a)  # B first: 1 is B
        if ab is None or ba is None:
            unparsed += 1
            continue
        s = (ab + (1 - ba)) / 2
        scores.append(s)
        wins += s > 0.5
        losses += s < 0.5
        ties += s == 0.5
        inconsistent += ab != 1 - ba
    if not scores:
        mean = lo = hi = math.nan
    else:
        mean, lo, hi = win_rate(scores)
    return {"win_rate": mean, "ci_low": lo, "ci_high": hi, "wins": wins, "ties": ties,
            "losses": losses, "inconsistent": inconsistent, "unparsed": unparsed,
            "examples": len(scores)}  # fmt: skip
