"""Perplexity of a causal LM over one text, by the sliding-window convention of the
transformers documentation ("Perplexity of fixed-length models").

The text is tokenized once; windows of `max_len` tokens start every `stride` tokens. Each window
scores only the tokens past the previous window's end (the rest are context), so every token is
scored once, with up to `max_len - stride` tokens of context. The first token of the text has
nothing to predict it and is never scored.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kiln.errors import InputError


def windows(num_tokens: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) of each window: tokens [begin, end) go in, and tokens
    [first_scored, end) are scored (each predicted from the ones before it in the window)."""
    out, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_len, num_tokens)
        # The window's first token has no prediction: the transformers loss shifts labels by one.
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == num_tokens:
            break
    return out


def default_stride(max_len: int) -> int:
    """512 (the documentation's), or half the window when that is shorter than 1024."""
    return min(512, max(1, max_len // 2))


def check_window(max_len: int, stride: int, context: int) -> None:
    """InputError unless 0 < stride <= max_len <= context."""
    if max_len <= 0 or max_len > context:
        raise InputError(f"max_len must be in [1, {context}] (the model's context), got {max_len}")
    if stride <= 0 or stride > max_len:
        raise InputError(f"stride must be in [1, max_len={max_len}], got {stride}")


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    ids: list[int] | torch.Tensor,
    max_len: int | None = None,
    stride: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Perplexity of `ids` under `model` (kiln's Transformer: input_ids [1, T] -> logits
    [1, T, vocab]): {"perplexity", "nll" (mean per scored token), "tokens" (scored)}.

    max_len defaults to min(1024, the model's context), stride to min(512, max_len // 2).
    """
    context = model.config.max_position_embeddings
    max_len = min(1024, context) if max_len is None else max_len
    stride = default_stride(max_len) if stride is None else stride
    check_window(max_len, stride, context)
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if ids.numel() < 2:
        raise InputError(f"perplexity needs at least 2 tokens, got {ids.numel()}")
    device = torch.device(device) if device else next(model.parameters()).device
    spans = windows(ids.numel(), max_len, stride)
    if progress:
        from tqdm import tqdm

        spans = tqdm(spans, desc="perplexity", unit="window")
    nll_sum, scored = 0.0, 0
    for begin, end, first in spans:
        window = ids[begin:end].to(device)
        logits = model(window[None])[0]  # [T, vocab]
        # logits at position t predict token t + 1: targets [first, end) use logits [first-1, end-1)
        pred = logits[first - 1 - begin : end - 1 - begin].float()
        nll_sum += F.cross_entropy(pred, window[first - begin :], reduction="sum").item()
        scored += end - first
    nll = nll_sum / scored
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": scored}
