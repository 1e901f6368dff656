"""Plain causal attention over dense K/V (SDPA with a causal or sliding-window mask): the
reference the paged and varlen kernels are checked against, and the training path's attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
