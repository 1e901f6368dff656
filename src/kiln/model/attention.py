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
import torch.nn.functional as F
from torch import nn

from kiln.config import ModelConfig
from kiln.model.layers import RMSNorm, RotaryEmbedding


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    q_offset: int = 0,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Plain causal attention; query i sits at position q_offset + i, keys at 0..Tk-1.

    q: [B, Tq, Hq, D]; k, v: [B, Tk, Hkv, D] -> [B, Tq, Hq, D]. A query sees keys with
    0 <= q_pos - k_pos < sliding_window (or all earlier keys without a window).
    """
    tq, tk = q.shape[1], k.shape[1]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
    gqa = q.shape[1] != k.shape[1]
    if q_offset == 0 and tq == tk and (sliding_window is None or sliding_window >= tk):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        q_pos = torch.arange(q_offset, q_offset + tq, device=q.device)[:, None]
        k_pos = torch.arange(tk, device=q.device)[None, :]
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= q_pos - k_pos < sliding_window
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


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
        shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, config.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # tokens already cached

    def attend(self, layer_idx, q, k, v, scale, sliding_window):
        start, end = self.length, self.length + q.shape[1]
        assert end <= self.max_len, f"KV cache overflow: {end} > {self.max_len}"
        self.k[layer_idx, :, start:end] = k
        self.v[layer_idx, :, start:end] = v
        lo = 0 if sliding_window is None else max(0, end - q.shape[1] - sliding_window + 1)
        keys, values = self.k[layer_idx, :, lo:end], self.v[layer_idx, :, lo:end]
        return causal_attention(q, keys, values, scale, start - lo, sliding_window)

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens


class Attention(nn.Module):
    """Multi-head attention with GQA/MQA, optional q/k/v bias and Qwen3's q/k norms."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
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
