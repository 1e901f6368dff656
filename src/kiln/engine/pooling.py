"""Embeddings: a prompt's final-norm hidden states pooled into one vector (vLLM's pooling
runner, the simple way: each prompt runs through the model on its own, outside the paged
batch). Mean pooling for models trained with it (sentence-transformers style), last-token
pooling for decoder embedding models (E5-Mistral, GTE-Qwen)."""

from __future__ import annotations

import math

import torch

POOLING = ("mean", "last")


@torch.inference_mode()
def embed_ids(model, ids: list[int], pooling: str, device: torch.device) -> list[float]:
    """The pooled (not normalized) float32 hidden state of one prompt."""
    hidden = model.hidden_states(torch.tensor([ids], device=device))[0].float()  # [T, H]
    return (hidden.mean(0) if pooling == "mean" else hidden[-1]).tolist()


def normalize(vec: list[float], dimensions: int | None = None) -> list[float]:
    """L2-normalized, after keeping the first `dimensions` (OpenAI's `dimensions`, Matryoshka
    style) if given."""
    if dimensions is not None:
        vec = vec[:dimensions]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]
