"""Weight sharing (ALBERT, Lan et al., 2020) as transformations of a plain Transformer, for
pretraining (`kiln pretrain --share-layers N --embedding-size E`):

- cross-layer sharing: each run of `share_layers` consecutive blocks computes with the first
  block's parameters (num_layers: one block's weights for the whole stack). Fewer parameters to
  store and optimize; the same compute.
- factorized embeddings: tokens embed in E < hidden_size dimensions, then a [hidden, E] matrix
  projects them up, so the embedding costs V*E + E*H instead of V*H. A tied LM head goes back
  through the same factors: logits = (h P) E_small^T.

Neither is a config.json field: `materialize` gives a plain Transformer (every block its own
copy, the embedding E_small P^T in full), the HF checkpoint kiln exports, which loads in kiln
and transformers alike and computes exactly what the shared model computes.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.errors import ConfigError
from kiln.model.transformer import Transformer


class FactorizedEmbedding(nn.Module):
    """Token embedding [V, E] then an up-projection E -> hidden: forward(ids) -> [..., hidden]."""

    def __init__(self, vocab_size: int, embedding_size: int, hidden_size: int):
        super().__init__()
        self.small = nn.Embedding(vocab_size, embedding_size)
        self.proj = nn.Linear(embedding_size, hidden_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.small(input_ids))

    def full(self) -> torch.Tensor:
        """The [V, hidden] embedding these factors compute."""
        return self.small.weight @ self.proj.weight.t()


class FactorizedHead(nn.Module):
    """The LM head tied to a FactorizedEmbedding: logits = (h @ P) @ E_small^T."""

    def __init__(self, embedding: FactorizedEmbedding):
        super().__init__()
        self.embedding = embedding

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        e = self.embedding
        return nn.functional.linear(hidden @ e.proj.weight, e.small.weight)


def share_layers(model: Transformer, group: int) -> None:
    """Give each block the parameters of the first block of its run of `group` (in place)."""
    for i, layer in enumerate(model.layers):
        base = model.layers[i - i % group]
        if base is layer:
            continue
        for name, param in base.named_parameters():
            parent, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(parent), attr, param)


@torch.no_grad()
def factorize_embeddings(model: Transformer, embedding_size: int, std: float = 0.02) -> None:
    """Replace the token embedding (and a tied LM head) by E-dimensional factors, initialized
    so that the product has the plain embedding's scale N(0, std) (in place)."""
    c = model.config
    emb = FactorizedEmbedding(c.vocab_size, embedding_size, c.hidden_size)
    emb.to(model.embed_tokens.weight.device)
    emb.small.weight.normal_(0.0, std)
    emb.proj.weight.normal_(0.0, embedding_size**-0.5)
    model.embed_tokens = emb
    if c.tie_word_embeddings:
        model.lm_head = FactorizedHead(emb)


def apply_sharing(
    model: Transformer, share: int = 1, embedding_size: int = 0, std: float = 0.02
) -> Transformer:
    """The model with ALBERT's cross-layer sharing (runs of `share` blocks; 1: none) and
    factorized embeddings (E = embedding_size; 0: none), in place."""
    if share < 1:
        raise ConfigError(f"share_layers must be >= 1, got {share}")
    if embedding_size < 0:
        raise ConfigError(f"embedding_size must be >= 0 (0: off), got {embedding_size}")
    if share > 1:
        share_layers(model, share)
    if embedding_size:
        factorize_embeddings(model, embedding_size, std)
    return model


def plain_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A (possibly factorized) Transformer's state dict as a plain Transformer's: the
    embedding multiplied out, a factorized head dropped (the plain model ties it again)."""
    if "embed_tokens.small.weight" not in state:
        return state
    out = {k: v for k, v in state.items() if not k.startswith(("embed_tokens.", "lm_head.emb"))}
    small, proj = state["embed_tokens.small.weight"], state["embed_tokens.proj.weight"]
    out["embed_tokens.weight"] = small @ proj.t()
    out.setdefault("lm_head.weight", out["embed_tokens.weight"])  # the head was tied
    return out


@torch.no_grad()
def materialize(model: Transformer) -> Transformer:
    """A plain Transformer computing what `model` computes: each block its own copy of the
    parameters it shares, the embedding in full."""
    state = {k: v.clone() for k, v in plain_state(model.state_dict()).items()}
    with torch.device("meta"):
        plain = Transformer(model.config)
    plain.load_state_dict(state, assign=True, strict=True)
    if model.config.tie_word_embeddings:
        plain.lm_head.weight = plain.embed_tokens.weight
    plain.reset_buffers(next(iter(state.values())).device)
    return plain.train(model.training)
