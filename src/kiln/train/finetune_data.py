"""Fine-tuning data: JSONL records, chat rendering with loss masks, padded batches.

A conversation's assistant spans come from rendering prefixes of it through the chat template:
turn i's span is render(messages[:i+1]) minus render(messages[:i], add_generation_prompt=True).
Each span and each gap between spans is tokenized on its own, so the loss mask matches the
rendered template exactly, token for token.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kiln.errors import InputError, TokenizerError

ROLES = ("system", "user", "assistant", "tool")
IGNORE = -100  # label of tokens that carry no loss (PyTorch's cross_entropy default)


@dataclass
class Example:
    """One tokenized sequence; loss_mask[t] says whether token t is trained on."""

    input_ids: list[int]
    loss_mask: list[bool]

    def __len__(self) -> int:
        return len(self.input_ids)


def read_jsonl(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """(where, record) for each non-blank line; `where` is "file:line" for error messages."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {str(path)!r} does not exist")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(record, dict):
                raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
            records.append((where, record))
    if not records:
        raise InputError(f"{path}: no records")
    return records


def check_messages(messages: Any, where: str, need_assistant: bool = True) -> list[dict]:
    """Validate OpenAI-shaped chat messages: a list of {"role", "content"} objects."""
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: messages must be a non-empty list of {{role, content}}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise InputError(f"{where}: message {i} needs a role in {ROLES}, got {m!r:.80}")
        if not isinstance(m.get("content"), str):
            raise InputError(f"{where}: message {i} ({m['role']}) needs string content")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise InputError(f"{where}: conversation has no assistant turn to train on")
    return messages


def _render(tok, messages: list[dict], add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)


def assistant_spans(tok, messages: list[dict], where: str = "") -> tuple[str, list[tuple]]:
    """The rendered conversation and the (start, end) character span of each assistant turn."""
    full = _render(tok, messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = _render(tok, messages[:i], add_generation_prompt=True)
        through = _render(tok, messages[: i + 1], add_generation_prompt=False)
        if not (through.startswith(head) and full.startswith(through)):
            raise TokenizerError(
                f"{where}: the chat template renders turn {i} differently once later turns "
                "follow it, so its assistant tokens cannot be located; train on conversations "
                "that end at that turn"
            )
        spans.append((len(head), len(through)))
    return full, spans


def encode_chat(tok, messages: list[dict], where: str = "") -> Example:
    """Tokens of the rendered conversation; the loss mask covers exactly the assistant turns.

    The rendered text is encoded with special tokens on, for the template's markers: training
    data is trusted, so special-token text inside its messages becomes special tokens too.
    """
    full, spans = assistant_spans(tok, messages, where)
    ids: list[int] = []
    mask: list[bool] = []
    pos = 0
    for start, end in [*spans, (len(full), len(full))]:
        for text, trained in ((full[pos:start], False), (full[start:end], True)):
            piece = tok.encode(text, add_special_tokens=False, allow_special=True) if text else []
            ids += piece
            mask += [trained] * len(piece)
        pos = end
    return Example(ids, mask)


def encode_prompt_completion(tok, prompt: str | list[dict], completion: str, where="") -> Example:
    """Prompt (text, or chat messages rendered with the generation prompt) plus a completion.

    A text prompt gets the tokenizer's special tokens (BOS) and the completion ends with EOS; a
    chat prompt gets the template's own assistant turn, end-of-turn token included.
    """
    if isinstance(prompt, str):
        head = tok.encode(prompt)
        tail = tok.encode(completion, add_special_tokens=False)
        if tok.eos_token_id is not None:
            tail.append(tok.eos_token_id)
    else:
        answer = {"role": "assistant", "content": completion}
        full, spans = assistant_spans(tok, [*prompt, answer], where)
        start, end = spans[-1]
        head = tok.encode(full[:start], add_special_tokens=False, allow_special=True)
        tail = tok.encode(full[start:end], add_special_tokens=False, allow_special=True)
    if not tail:
        raise InputError(f"{where}: empty completion")
    return Example(head + tail, [False] * len(head) + [True] * len(tail))


class Batches:
    """batch(i) is a pure function of i: epoch e visits the items in a seeded permutation.

    `collate(items)` turns batch_size items into the batch the loss function takes.
    """

    def __init__(self, items: list, batch_size: int, collate, seed: int):
        if not items:
            raise InputError("no examples to batch")
        self.items, self.batch_size, self.collate, self.seed = items, batch_size, collate, seed

    def __call__(self, i: int):
        n = len(self.items)
        picks = []
        for j in range(i * self.batch_size, (i + 1) * self.batch_size):
            epoch, k = divmod(j, n)
            order = list(range(n))
            random.Random(self.seed * 100_003 + epoch).shuffle(order)
            picks.append(self.items[order[k]])
        return self.collate(picks)


def split_train_val(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Shuffle with `seed`; hold out round(val_fraction * n) items (at least one when asked)."""
    items = list(items)
    random.Random(seed).shuffle(items)
    n_val = max(1, round(val_fraction * len(items))) if val_fraction > 0 else 0
    if n_val >= len(items):
        raise InputError(f"{len(items)} examples leave nothing to train on after the val split")
    return items[n_val:], items[:n_val]


def pad(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids [B, T] and next-token labels [B, T] (IGNORE where untrained)."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e)
        ids[row, :n] = torch.tensor(e.input_ids)
        trained = torch.tensor(e.loss_mask[1:], dtype=torch.bool)
        labels[row, : n - 1] = torch.where(trained, ids[row, 1:n], IGNORE)
    return ids, labels
