"""ONE decoder-only Transformer for every supported family; family quirks live in ModelConfig."""

from __future__ import annotations

import math

import torch
from torch import nn

from kiln.config import ModelConfig
from kiln.model.attention import DENSE_CAUSAL, Attention
from kiln.model.layers import MLP, MoE, RotaryEmbedding, make_norm
from kiln.model.ssm import make_mixer


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    An SSM layer (config.layer_types) has a Mamba `mixer` in attention's place, and no MLP
    where the config has none (intermediate_size 0: Mamba's own models)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = make_norm(config)
        if config.is_ssm_layer(layer_idx):
            self.mixer = make_mixer(config, layer_idx)
        else:
            self.self_attn = Attention(config, layer_idx)
        self.mlp = None
        if config.intermediate_size:
            self.post_attention_layernorm = make_norm(config)
            self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config)

    def forward(self, x, positions, rotary, backend):
        h = self.input_layernorm(x)
        if hasattr(self, "mixer"):
            x = x + self.mixer(h, backend)
        else:
            x = x + self.self_attn(h, positions, rotary, backend)
        if self.mlp is None:
            return x
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Decoder-only LM. forward(input_ids [B, T] or [N]) -> logits [B, T, vocab] or [N, vocab].

    Parameter names follow Hugging Face's Llama layout without the `model.` prefix
    (`layers.0.self_attn.q_proj.weight`, `lm_head.weight`), whatever the family.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
            self.rotary = None
        else:
            self.embed_positions = None
            self.rotary = RotaryEmbedding(config) if config.position_embedding == "rope" else None
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        backend=None,
    ) -> torch.Tensor:
        """Final-norm hidden states [..., hidden] for input_ids [...] at `positions` [...]."""
        if positions is None:
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
            positions = positions.expand_as(input_ids)
        backend = backend or DENSE_CAUSAL
        x = self.embed_tokens(input_ids)
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions)
        for layer in self.layers:
            x = layer(x, positions, self.rotary, backend)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        backend=None,
    ) -> torch.Tensor:
        return self.compute_logits(self.hidden_states(input_ids, positions, backend))

    def reset_buffers(self, device: torch.device | str) -> None:
        """Rebuild non-persistent buffers (RoPE tables) on `device`."""
        if self.rotary is not None:
            self.rotary.reset(torch.device(device))

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """GPT-2 style init for training from scratch: N(0, std), residual outputs scaled."""
        residual_std = std / math.sqrt(2 * self.config.num_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                if name.endswith("bias"):
                    p.zero_()
                else:
                    p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, residual_std)
            else:
                p.normal_(0.0, std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
