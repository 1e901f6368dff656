"""Reward functions for the RL verbs: verifiable checks and a reward model's score.

A reward function has TRL's signature, `fn(prompts, completions, **columns) -> list[float]`:
one score per completion, where `columns` are the prompt records' other fields, one value per
completion (an `answer` column reaches the function as `answer=[...]`). `--reward` names one
as `module:function` or `path/to/file.py:function`; `--reward-model DIR` scores with a reward
model that `kiln reward` trained (RewardModelScorer).

    exact_match       the completion, stripped, equals the record's `answer`
    regex_match       the completion, stripped, matches the record's `pattern` in full
    count_continues   the completion's first number is the prompt's last number plus one
    number_sum        the completion's first number is the sum of the prompt's numbers
    unit_test(check)  1 when `check(completion, **record)` returns without raising, else 0
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

from kiln.errors import InputError

RewardFn = Callable[..., list[float]]
NUMBER = re.compile(r"-?\d+")


def exact_match(prompts, completions, answer, **_) -> list[float]:
    """1.0 where the stripped completion equals the stripped answer."""
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]


def regex_match(prompts, completions, pattern, **_) -> list[float]:
    """1.0 where the stripped completion matches the record's regex in full."""
    return [float(re.fullmatch(p, c.strip()) is not None) for c, p in zip(completions, pattern)]


def _numbers(text) -> list[int]:
    if not isinstance(text, str):  # chat messages: the last one asks
        text = text[-1]["content"]
    return [int(n) for n in NUMBER.findall(text)]


def _first_number(text: str) -> int | None:
    found = NUMBER.search(text)
    return int(found.group()) if found else None


def count_continues(prompts, completions, **_) -> list[float]:
    """Continue the count: 1.0 where the completion's first number is the prompt's last + 1."""
    return [
        float(_first_number(c) == _numbers(p)[-1] + 1) if _numbers(p) else 0.0
        for p, c in zip(prompts, completions)
    ]


def number_sum(prompts, completions, **_) -> list[float]:
    """1.0 where the completion's first number is the sum of the numbers in the prompt."""
    return [float(_first_number(c) == sum(_numbers(p))) for p, c in zip(prompts, completions)]


def unit_test(check: Callable[..., object]) -> RewardFn:
    """A reward function from a test: 1.0 where `check(completion, **record)` returns, 0.0
    where it raises (a failed assert or any error)."""

    def reward(prompts, completions, **columns) -> list[float]:
        scores = []
        for i, completion in enumerate(completions):
            record = {k: v[i] for k, v in columns.items()}
            try:
                check(completion, **record)
            except Exception:
                scores.append(0.0)
            else:
                scores.append(1.0)
        return scores

    reward.__name__ = getattr(check, "__name__", "unit_test")
    return reward


def load_reward(spec: str) -> RewardFn:
    """The reward function `module:function` or `path/to/file.py:function` names."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise InputError(f"--reward wants module:function or file.py:function, got {spec!r}")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise InputError(f"--reward: no file {where!r}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise InputError(f"--reward: cannot import {where!r} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise InputError(f"--reward: {where!r} has no function {name!r}")
    return fn


class RewardModelScorer:
    """A reward model's scalar for each (prompt, completion), encoded as it was trained."""

    def __init__(self, path: str, device=None, batch_size: int = 32):
        from kiln.tokenizer.hf import load_tokenizer
        from kiln.train.reward import load_reward_model

        self.model = load_reward_model(path, device=device)
        self.tok = load_tokenizer(path)
        self.batch_size = batch_size

    def __call__(self, prompts, completions, **_) -> list[float]:
        from kiln.train.finetune_data import encode_prompt_completion

        rows = [
            encode_prompt_completion(self.tok, p, c or " ") for p, c in zip(prompts, completions)
        ]
        scores: list[float] = []
        for start in range(0, len(rows), self.batch_size):
            scores += self.model.score_examples(rows[start : start + self.batch_size]).tolist()
        return scores


def make_reward(reward: str | None, reward_model: str | None, device=None) -> RewardFn:
    """The run's reward: the function --reward names, or --reward-model's scorer."""
    if (reward is None) == (reward_model is None):
        raise InputError("give one of --reward module:function or --reward-model DIR")
    if reward is not None:
        return load_reward(reward)
    return RewardModelScorer(reward_model, device=device)


def score(reward_fn: RewardFn, prompts: list, completions: list[str], records: list[dict]):
    """reward_fn over a batch, with each record's other fields as columns; checked floats."""
    keys = {k for r in records for k in r} - {"prompt"}
    columns = {k: [r.get(k) for r in records] for k in keys}
    scores = reward_fn(prompts, completions, **columns)
    if len(scores) != len(completions):
        raise InputError(f"the reward function gave {len(scores)} scores for "
                         f"{len(completions)} completions")  # fmt: skip
    return [float(s) for s in scores]
