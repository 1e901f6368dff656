"""Paged attention backends: the step's AttentionMetadata plus the KV pool they write and read.

A backend is what the model's Attention modules call (`attend(layer_idx, q, k, v, scale,
sliding_window)`, see kiln.model.attention). The step's tokens come flat: first the rows that
compute one token (decodes), then the prefill chunks. Each backend writes the new K/V into the
pool at `slot_mapping`, then attends each query over its sequence's pages.

- TorchPagedBackend: plain torch, one sequence at a time; the reference, runs on CPU.
- TritonPagedBackend: kiln.kernels' store_kvcache, paged decode (split-KV) and varlen prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kiln.model.attention import causal_attention


@dataclass
class AttentionMetadata:
    """Where the step's flat tokens sit: rows [0, num_decodes) compute one token each."""

    positions: torch.Tensor  # [N] int64
    slot_mapping: torch.Tensor  # [N] int64, -1 = do not store
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32: tokens in the KV after this step, per sequence
    cu_seqlens_q: torch.Tensor  # [B + 1] int32: row offsets of each sequence's queries
    num_decodes: int  # sequences (and tokens) at the front with one query each
    query_lens: list[int]  # [B] on the host
    context_lens_host: list[int]  # [B] on the host
    block_tables_host: list[list[int]]

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


class KVCache:
    """The pool: per layer k and v of [num_blocks, block_size, num_kv_heads, head_dim]."""

    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
        shape = (2, num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size

    @staticmethod
    def bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * elem

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[0, layer_idx], self.data[1, layer_idx]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks (every layer, k and v)."""
        if copies:
            src, dst = (torch.tensor(c, device=self.data.device) for c in zip(*copies))
            self.data[:, :, dst] = self.data[:, :, src]


class TorchPagedBackend:
    """Reference paged attention in plain torch (gathers each sequence's pages)."""

    def __init__(self, kv_cache: KVCache):
        self.kv_cache = kv_cache
        self.metadata: AttentionMetadata | None = None

    def set_metadata(self, md: AttentionMetadata) -> None:
        self.metadata = md

    def attend(self, layer_idx, q, k, v, scale, sliding_window):
        md = self.metadata
        k_cache, v_cache = self.kv_cache.layer(layer_idx)
        store_kvcache_ref(k, v, k_cache, v_cache, md.slot_mapping)
        d = md.num_decodes
        if d == md.num_seqs and q.shape[0] == d:
            return self._decode(q, k_cache, v_cache, scale, sliding_window)
        out = torch.empty_like(q)
        if d:
            out[:d] = self._decode(q[:d], k_cache, v_cache, scale, sliding_window)
        bs = self.kv_cache.block_size
        start = d
        rows = zip(md.query_lens[d:], md.context_lens_host[d:], md.block_tables_host[d:])
        for qlen, ctx, table in rows:  # prefill chunks, one sequence at a time
            lo = 0 if sliding_window is None else max(0, ctx - qlen - sliding_window + 1)
            first = lo // bs
            blocks = torch.tensor(table[first : -(-ctx // bs)], device=q.device)
            span = slice(lo - first * bs, ctx - first * bs)
            keys = k_cache[blocks].flatten(0, 1)[span]  # [ctx - lo, Hkv, D]
            values = v_cache[blocks].flatten(0, 1)[span]
            qs = q[start : start + qlen]
            o = causal_attention(
                qs[None], keys[None], values[None], scale, ctx - qlen - lo, sliding_window
            )
            out[start : start + qlen] = o[0]
            start += qlen
        return out

    def _decode(self, q, k_cache, v_cache, scale, sliding_window):
        """All one-query rows in one masked SDPA over their gathered, padded pages."""
        md = self.metadata
        d, bs = q.shape[0], self.kv_cache.block_size
        max_ctx = max(md.context_lens_host[:d])
        tables = md.block_tables[:d, : -(-max_ctx // bs)].long()  # padding points at block 0
        keys = k_cache[tables].flatten(1, 2)[:, :max_ctx]  # [d, max_ctx, Hkv, D]
        values = v_cache[tables].flatten(1, 2)[:, :max_ctx]
        k_pos = torch.arange(max_ctx, device=q.device)[None, :]
        q_pos = md.context_lens[:d, None].long() - 1
        mask = k_pos <= q_pos  # [d, max_ctx]
        if sliding_window is not None:
            mask &= q_pos - k_pos < sliding_window
        out = F.scaled_dot_product_attention(
            q[:, :, None],  # [d, Hq, 1, D]
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=mask[:, None, None, :],
            scale=scale,
            enable_gqa=q.shape[1] != k_cache.shape[2],
        )
        return out[:, :, 0]


def store_kvcache_ref(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Write k/v [N, Hkv, D] into the pool at slot_mapping [N] (slots < 0 skipped)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]


class TritonPagedBackend:
    """Triton kernels: paged decode for the one-token rows, varlen prefill for the rest."""

    def __init__(self, kv_cache: KVCache):
        from kiln.kernels.paged_decode_attention import paged_decode_attention
        from kiln.kernels.store_kvcache import store_kvcache
        from kiln.kernels.varlen_prefill_attention import varlen_prefill_attention

        self.kv_cache = kv_cache
        self.metadata: AttentionMetadata | None = None
        self._store = store_kvcache
        self._decode = paged_decode_attention
        self._prefill = varlen_prefill_attention
        self._decode_views: dict[str, torch.Tensor] = {}

    def set_metadata(self, md: AttentionMetadata) -> None:
        self.metadata = md
        d = md.num_decodes
        self._decode_views = {
            "block_tables": md.block_tables[:d],
            "context_lens": md.context_lens[:d],
            "prefill_block_tables": md.block_tables[d:],
            "prefill_context_lens": md.context_lens[d:],
            "prefill_cu_seqlens_q": md.cu_seqlens_q[d:] - d,
        }

    def attend(self, layer_idx, q, k, v, scale, sliding_window):
        md, views = self.metadata, self._decode_views
        k_cache, v_cache = self.kv_cache.layer(layer_idx)
        self._store(k, v, k_cache, v_cache, md.slot_mapping)
        d = md.num_decodes
        if d == md.num_seqs and q.shape[0] == d:
            return self._decode(
                q, k_cache, v_cache, views["block_tables"], views["context_lens"], scale,
                sliding_window,
            )  # fmt: skip
        out = torch.empty_like(q)
        if d:
            out[:d] = self._decode(
                q[:d], k_cache, v_cache, views["block_tables"], views["context_lens"], scale,
                sliding_window,
            )  # fmt: skip
        out[d:] = self._prefill(
            q[d:], k_cache, v_cache, views["prefill_cu_seqlens_q"],
            views["prefill_context_lens"], views["prefill_block_tables"], scale, sliding_window,
        )  # fmt: skip
        return out


def make_backend(name: str, kv_cache: KVCache):
    """The backend called `name` ("torch" or "triton") over `kv_cache`."""
    if name == "triton":
        return TritonPagedBackend(kv_cache)
    return TorchPagedBackend(kv_cache)
