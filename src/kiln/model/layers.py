"""The building blocks: norms, rotary embeddings (with scaling), gated and plain MLPs, MoE."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import ModelConfig
from kiln.model.rope_scaling import dynamic_ntk_freqs, yarn_inv_freq


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 like the reference implementations."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.hidden_size
    if config.norm_type == "layernorm":
        return nn.LayerNorm(dim, eps=config.norm_eps)
    return RMSNorm(dim, eps=config.norm_eps)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], with linear, llama3 or YaRN scaling applied."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind == "yarn":
        return yarn_inv_freq(d, config.rope_theta, scaling)[0]
    return inv_freq.float()


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE, cos/sin tables precomputed for every position up to the context."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.register_buffer("cos_sin", self._table(None), persistent=False)

    def _table(self, device: torch.device | None) -> torch.Tensor:
        c = self.config
        scaling = c.rope_scaling or {}
        if scaling.get("rope_type") == "dynamic":
            freqs = dynamic_ntk_freqs(c.head_dim, c.rope_theta, scaling, c.max_position_embeddings)
            freqs = freqs.to(device)
        else:
            inv_freq = rope_inv_freq(c).to(device)
            t = torch.arange(c.max_position_embeddings, device=device, dtype=torch.float32)
            freqs = torch.outer(t, inv_freq)  # [max_pos, head_dim / 2]
        table = torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [max_pos, head_dim]
        if scaling.get("rope_type") == "yarn":  # YaRN's attention factor scales cos and sin
            table = table * yarn_inv_freq(c.head_dim, c.rope_theta, scaling)[1]
        return table

    def reset(self, device: torch.device) -> None:
        """Recompute the table on `device` (after loading weights onto a meta-built model)."""
        self.cos_sin = self._table(device)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [...], q: [..., Hq, D], k: [..., Hkv, D]
        cos, sin = self.cos_sin[positions].unsqueeze(-2).chunk(2, dim=-1)  # [..., 1, D/2]
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


def activation_fn(name: str):
    if name == "silu":
        return F.silu
    if name == "gelu_new":
        return lambda x: F.gelu(x, approximate="tanh")
    return F.gelu


class MLP(nn.Module):
    """SwiGLU (gate_proj, up_proj, down_proj) or, for GPT-2, up_proj -> act -> down_proj."""

    def __init__(self, config: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        h, i, bias = (
            config.hidden_size,
            intermediate_size or config.intermediate_size,
            config.mlp_bias,
        )
        self.gated = config.gated_mlp
        if self.gated:
            self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act = activation_fn(config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


def route(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts in float32, the top-k (weights [N, k] float32, ids [N, k]),
    the k weights renormalized to sum to 1 when `renormalize` (Mixtral; Qwen3-MoE's
    norm_topk_prob)."""
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, chosen = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, chosen


class MoE(nn.Module):
    """Sparse MLP (Mixtral, Qwen3-MoE): softmax router, top-k experts, weights renormalized over
    the k as the family says. In training the router logits of the last forward are kept
    (`router_logits`, [N, E]) for the auxiliary losses (kiln.train.moe_loss)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.renormalize = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        inter = config.moe_intermediate_size
        self.experts = nn.ModuleList(MLP(config, inter) for _ in range(config.num_experts))
        self.router_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, H]
        logits = self.gate(x)  # [N, E]
        self.router_logits = logits if self.training else None
        weights, chosen = route(logits, self.top_k, self.renormalize)  # [N, k]
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        # Loop over experts, gathering the tokens routed to each (no dense E x N compute).
        for e in chosen.unique().tolist():
            token_idx, slot = (chosen == e).nonzero(as_tuple=True)
            y = self.experts[e](x[token_idx]) * weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y)
        return out.reshape(shape)
