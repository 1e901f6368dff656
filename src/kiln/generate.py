"""Reference generation: a contiguous KV cache, greedy or temperature/top-k/top-p sampling.

This is the plain loop every faster path (the engine in kiln.engine) is checked against.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from kiln.errors import InputError


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids [B] from logits [B, vocab]; temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def validate_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if temperature < 0:
        raise InputError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise InputError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")


@torch.inference_mode()
def generate_stream(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_token_ids: set[int] | None = None,
) -> Iterator[torch.Tensor]:
    """Yield next tokens [B] one step at a time; input_ids [B, T] share one length."""
    from kiln.model.attention import ContiguousKVCache

    validate_sampling(temperature, top_k, top_p)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    b, t = input_ids.shape
    if t == 0:
        raise InputError("empty prompt: give at least one token")
    config = model.config
    total = t + max_new_tokens
    if total > config.max_position_embeddings:
        raise InputError(
            f"prompt ({t} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context of {config.max_position_embeddings} tokens"
        )
    device = input_ids.device
    dtype = next(model.parameters()).dtype
    cache = ContiguousKVCache(config, b, total, dtype, device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    eos = torch.tensor(sorted(eos_token_ids or []), dtype=torch.long, device=device)
    tokens = input_ids
    for _ in range(max_new_tokens):
        positions = torch.arange(cache.length, cache.length + tokens.shape[1], device=device)
        hidden = model.hidden_states(tokens, positions.expand(b, -1), cache)
        cache.advance(tokens.shape[1])
        logits = model.compute_logits(hidden[:, -1])  # [B, vocab]
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        yield nxt
        finished |= torch.isin(nxt, eos)
        if bool(finished.all()):
            return
        tokens = nxt[:, None]


def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 32, **kwargs) -> torch.Tensor:
    """Prompt plus generated tokens [B, T + new] (stops early once every row hit an EOS)."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    steps = list(generate_stream(model, input_ids, max_new_tokens, **kwargs))
    if not steps:
        return input_ids
    return torch.cat([input_ids, torch.stack(steps, dim=1)], dim=1)
