"""Attention: the q/k/v math is a module; the attention op itself is a pluggable backend.

A backend is any object with

    attend(layer_idx, q, k, v, scale, sliding_window) -> out

where q, k, v carry the token layout of the model input ([B, T, H, D] for batched input, or
[N, H, D] for the engine's flat token list) and `out` has q's shape. The backend owns any KV
cache: `DenseCausal` (training, no cache), `ContiguousKVCache` (the reference generation loop),
and the engine's paged backends (kiln.engine) all plug into the same call.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.config import ModelConfig
from kiln.kernels.causal_attention import causal_attention
from kiln.model.layers import RMSNorm, RotaryEmbedding


class DenseCausal:
    """Training / reference backend: causal attention within each row of a [B, T] batch."""

    def attend(self, layer_idx, q, k, v, scale, sliding_window):
        return causal_attention(q, k, v, scale, 0, sliding_window)


DENSE_CAUSAL = DenseCausal()


class ContiguousKVCache:
    """Reference generation backend: one contiguous [B, max_len] K/V buffer per layer.

    Every row of the batch has the same length; `advance(T)` moves the write offset after a
    forward of T tokens.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, dtype, device):
        shape = (config.num_kv_layers, batch_size, max_len, config.num_kv_heads, config.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # tokens already cached
        self.ssm = None  # an SSM layer's recurrent state, one slot a row (kiln.model.ssm)
        if config.num_ssm_layers:
            from kiln.model.ssm import SSMStateCache

            self.ssm = SSMStateCache(config, batch_size, dtype, device)
            self.rows = torch.arange(batch_size, device=device)

    def attend(self, layer_idx, q, k, v, scale, sliding_window):
        start, end = self.length, self.length + q.shape[1]
        assert end <= self.max_len, f"KV cache overflow: {end} > {self.max_len}"
        self.k[layer_idx, :, start:end] = k
        self.v[layer_idx, :, start:end] = v
        lo = 0 if sliding_window is None else max(0, end - q.shape[1] - sliding_window + 1)
        keys, values = self.k[layer_idx, :, lo:end], self.v[layer_idx, :, lo:end]
        return causal_attention(q, keys, values, scale, start - lo, sliding_window)

    def ssm_states(self, layer_idx: int):
        """The layer's SSMStates: row b is slot b; it has a state once a forward has run."""
        has = torch.full_like(self.rows, self.length > 0, dtype=torch.bool)
        return self.ssm.view(layer_idx, self.rows, has, decode=self.length > 0)

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens


class Attention(nn.Module):
    """Multi-head attention with GQA/MQA, optional q/k/v bias and Qwen3's q/k norms."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = config.kv_layers.index(layer_idx)  # its K/V's index in a cache
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.sliding_window = config.sliding_windows[layer_idx]
        h, q_dim = config.hidden_size, self.num_heads * self.head_dim
        kv_dim = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(h, q_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_dim, h, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding | None,
        backend,
    ) -> torch.Tensor:
        lead = x.shape[:-1]  # [B, T] or [N]
        q = self.q_proj(x).view(*lead, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            q, k = rotary(positions, q, k)
        out = backend.attend(self.layer_idx, q, k, v, self.scale, self.sliding_window)
        return self.o_proj(out.reshape(*lead, self.num_heads * self.head_dim))
