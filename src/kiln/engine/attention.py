"""Paged attention backends: the step's AttentionMetadata plus the KV pool they write and read.

A backend is what the model's Attention modules call (`attend(layer_idx, q, k, v, scale,
sliding_window)`, see kiln.model.attention). The step's tokens come flat: first the rows that
compute one token (decodes), then the prefill chunks. Each backend writes the new K/V into the
pool at `slot_mapping`, then attends each query over its sequence's pages.

One backend class over the engine's Ops (kiln.engine.ops): the kernels' plain-torch references
(run anywhere; the reference) or their Triton versions (store_kvcache, split-KV paged decode,
varlen prefill over paged prefixes, the two together for a mixed graph's steps, whose decodes
are found on the device (kiln.kernels.mixed_attention), and qkv_prepare: q/k norm + RoPE +
K/V store in one launch, for models transformed by kiln.engine.fuse, which call `attend_qkv`;
a step of decodes only goes from qkv to attention output in one launch,
kiln.kernels.decode_qkv).

The pool may be fp8 / int8 (kv_cache_dtype: the kernels quantize on store and dequantize on
load, with each layer's per-head scales, kiln.kernels.kv_quant), and under H2O eviction the
attention ops also add each key's attention mass to the pool's per-slot `scores`
(kiln.engine.kv_eviction).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kiln.engine.kv_scales import head_amax, scale_from_amax
from kiln.engine.ops import Ops
from kiln.engine.transfer import to_device
from kiln.kernels.common import HeadLayout, PagedKV, QKNormRope
from kiln.kernels.kv_quant import is_quantized, layer_scales
from kiln.kernels.qkv_prepare import split_norm_rope_ref


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
    # the one-query sequences are found on the device from cu_seqlens_q, not counted on the
    # host (num_decodes 0): a mixed CUDA graph's steps, captured once for any mix
    varlen_decodes: bool = False

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


class KVCache:
    """The pool: per layer k and v of [num_blocks, block_size, num_kv_heads, head_dim], in
    `dtype`; an fp8 / int8 pool also holds each layer's scales (kiln.kernels.kv_quant)."""

    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
        shape = (2, num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.scales = None  # [num_layers, 4, num_kv_heads]: k, v scales and their reciprocals
        if is_quantized(dtype):
            self.scales = torch.ones(num_layers, 4, num_kv_heads, device=device)
        # H2O (kiln.engine.kv_eviction): each slot's attention mass, summed over every layer,
        # head and query of its sequence's last step; None unless track_scores()
        self.scores: torch.Tensor | None = None

    def track_scores(self) -> None:
        """Keep `scores` [num_blocks, block_size] float32 (the attention ops add to it)."""
        self.scores = torch.zeros(self.num_blocks, self.block_size, device=self.data.device)

    def reset_scores(self, blocks: list[int]) -> None:
        if self.scores is not None and blocks:
            self.scores[to_device(blocks, torch.long, self.data.device)] = 0.0

    def block_scores(self, blocks: list[int]) -> list[float]:
        """The attention mass of each of the given blocks (reads the device)."""
        return self.scores[to_device(blocks, torch.long, self.data.device)].sum(1).tolist()

    @staticmethod
    def bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * elem

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[0, layer_idx], self.data[1, layer_idx]

    def layer_scales(self, layer_idx: int) -> torch.Tensor | None:
        """The layer's [4, Hkv] scales (None: the pool is in the model's dtype)."""
        return None if self.scales is None else self.scales[layer_idx]

    def set_scales(self, layer_idx: int, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
        """Set one layer's k and v scales [Hkv] (in place: CUDA graphs read this buffer)."""
        self.scales[layer_idx].copy_(layer_scales(k_scale, v_scale))

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks (every layer, k and v)."""
        if copies:
            src, dst = to_device(list(zip(*copies)), torch.long, self.data.device)
            self.data[:, :, dst] = self.data[:, :, src]
            if self.scores is not None:
                self.scores[dst] = self.scores[src]


class HiddenSlots:
    """A pool beside the KV pool, addressed by the same slots: each computed token's final
    hidden state [num_blocks * block_size + 1, hidden] (what the hidden-state drafts read,
    kiln.engine.spec_decode.hidden). The spare last row takes the writes of padded rows (slot
    -1) and is what they read."""

    def __init__(self, num_blocks, block_size, hidden_size, dtype, device):
        self.block_size = block_size
        self.data = torch.zeros(
            num_blocks * block_size + 1, hidden_size, dtype=dtype, device=device
        )

    @staticmethod
    def bytes_per_block(block_size: int, hidden_size: int, dtype: torch.dtype) -> int:
        return block_size * hidden_size * torch.empty((), dtype=dtype).element_size()

    def write(self, slot_mapping: torch.Tensor, hidden: torch.Tensor) -> None:
        """hidden [N, H] of the tokens at slot_mapping [N] (-1: the spare row)."""
        self.data[slot_mapping] = hidden

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write, as KVCache.copy_blocks."""
        if copies:
            src, dst = to_device(list(zip(*copies)), torch.long, self.data.device)
            blocks = self.data[:-1].view(-1, self.block_size, self.data.shape[1])
            blocks[dst] = blocks[src]


class PagedBackend:
    """Store the step's K/V, then paged decode for the one-token rows, varlen prefill for the
    rest, with the given ops (the kernels' references or their Triton versions);
    ops.paged_decode_qkv (None: qkv_prepare, then decode) does a decode-only step of
    attend_qkv in one op."""

    def __init__(self, kv_cache: KVCache, ops: Ops):
        self.kv_cache = kv_cache
        self.ops = ops
        self.metadata: AttentionMetadata | None = None
        self._views: dict[str, torch.Tensor] = {}
        # An fp8 / int8 pool whose scales come from the next eager step's K/V (each layer's
        # set before its first store; kiln.engine.kv_scales)
        self.calibrating = False

    def set_metadata(self, md: AttentionMetadata) -> None:
        self.metadata = md
        d = md.num_decodes
        self._views = {
            "block_tables": md.block_tables[:d],
            "context_lens": md.context_lens[:d],
            "prefill_block_tables": md.block_tables[d:],
            "prefill_context_lens": md.context_lens[d:],
            # a view when no decode comes first (a mixed CUDA graph reads the staged buffer)
            "prefill_cu_seqlens_q": md.cu_seqlens_q[d:] - d if d else md.cu_seqlens_q,
        }

    def attend(self, layer_idx, q, k, v, scale, sliding_window):
        k_cache, v_cache = self.kv_cache.layer(layer_idx)
        if self.calibrating:  # this layer's scales from the step's own K/V, before the store
            amax_k, amax_v = head_amax(k), head_amax(v)
            kv_dtype = k_cache.dtype
            self.kv_cache.set_scales(
                layer_idx, scale_from_amax(amax_k, kv_dtype), scale_from_amax(amax_v, kv_dtype)
            )
        scales = self.kv_cache.layer_scales(layer_idx)
        self.ops.store_kvcache(k, v, k_cache, v_cache, self.metadata.slot_mapping, scales)
        return self._attend_cached(q, self._kv(layer_idx), scale, sliding_window)

    def _kv(self, layer_idx: int, **fields) -> PagedKV:
        """The layer's cache (and scales) as the kernels take it."""
        k_cache, v_cache = self.kv_cache.layer(layer_idx)
        cache = self.kv_cache
        return PagedKV(
            k_cache, v_cache, scales=cache.layer_scales(layer_idx), scores=cache.scores, **fields
        )

    def attend_qkv(
        self,
        layer_idx: int,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        heads: HeadLayout,
        qk: QKNormRope,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """attend() straight from the fused qkv projection's output [N, (Hq + 2 Hkv) * D]:
        per-head q/k RMSNorm and RoPE (those qk holds) and the K/V store in one op
        (kiln.kernels.qkv_prepare), then attention; returns [N, Hq, D]. A step of decodes only
        does it all in one op (kiln.kernels.decode_qkv)."""
        md, ops = self.metadata, self.ops
        if self.calibrating:  # the unfused reference: the scales need k after norm and RoPE
            q, k, v = split_norm_rope_ref(qkv, positions, heads, qk)
            return self.attend(layer_idx, q, k, v, scale, sliding_window)
        kv = self._kv(layer_idx)
        if ops.paged_decode_qkv is not None and self._decode_only(qkv.shape[0]):
            kv = self._decode_kv(kv, md.slot_mapping)
            return ops.paged_decode_qkv(qkv, positions, heads, qk, kv, scale, sliding_window)
        q = ops.qkv_prepare(qkv, positions, heads, qk, replace(kv, slot_mapping=md.slot_mapping))
        return self._attend_cached(q, kv, scale, sliding_window)

    def _decode_only(self, num_tokens: int) -> bool:
        md = self.metadata
        return md.num_decodes == md.num_seqs and num_tokens == md.num_decodes

    def _decode_kv(self, kv: PagedKV, slot_mapping=None) -> PagedKV:
        """The layer's cache as the step's decodes (its first num_decodes sequences) see it."""
        views = self._views
        return replace(
            kv,
            block_tables=views["block_tables"],
            context_lens=views["context_lens"],
            slot_mapping=slot_mapping,
        )

    def _attend_cached(self, q, kv: PagedKV, scale, sliding_window):
        md, views, decode = self.metadata, self._views, self.ops.paged_decode_attention
        d = md.num_decodes
        if self._decode_only(q.shape[0]):
            return decode(q, self._decode_kv(kv), scale, sliding_window)
        prefill_kv = replace(
            kv,
            block_tables=views["prefill_block_tables"],
            context_lens=views["prefill_context_lens"],
        )
        if md.varlen_decodes:  # a mixed graph's step: decodes by the decode kernel all the same
            cu = views["prefill_cu_seqlens_q"]
            return self.ops.mixed_attention(q, prefill_kv, cu, scale, sliding_window)
        prefill = self.ops.varlen_prefill_attention(
            q[d:], prefill_kv, views["prefill_cu_seqlens_q"], scale, sliding_window
        )
        if not d:  # prefill chunks only: no copy into a joint output
            return prefill
        out = torch.empty_like(q)
        out[:d] = decode(q[:d], self._decode_kv(kv), scale, sliding_window)
        out[d:] = prefill
        return out

    @torch.inference_mode()
    def compile_kernels(
        self,
        num_heads: int,
        windows: set[int | None],
        max_num_seqs: int,
        fused_qkv: tuple[bool, bool] | None = None,
        dtype: torch.dtype | None = None,
    ):
        """Run every attention-kernel variant an eager (prefill) step can pick once, so that
        Triton compiles them now rather than on a live request: one per block of sequence
        offsets for varlen prefill (up to max_num_seqs), one per split count for paged decode,
        for each sliding window (None: none) the model's layers use. fused_qkv: (q/k norm,
        RoPE) of a model that calls attend_qkv, whose decode_qkv variants compile too. dtype:
        the queries' (None: the cache's; an fp8 / int8 cache's queries are the model's)."""
        from kiln.kernels.paged_decode_attention import MAX_SPLITS
        from kiln.kernels.varlen_prefill_attention import MIN_BLOCK_B

        ops = self.ops
        if not self.kv_cache.data.shape[1]:  # no attention layer (an all-SSM model)
            return
        k_cache, v_cache = self.kv_cache.layer(0)  # read only: nothing is stored
        scales, scores = self.kv_cache.layer_scales(0), self.kv_cache.scores  # scores: h2o
        dev, head_dim = k_cache.device, k_cache.shape[-1]
        act = dtype or k_cache.dtype  # the queries'

        def zeros(*shape, dtype=act):
            return torch.zeros(shape, dtype=dtype, device=dev)

        scale = head_dim**-0.5
        sizes = [min(b, max_num_seqs) for b in (MIN_BLOCK_B << i for i in range(16))]
        for n in sorted(set(sizes)):  # prefill: n sequences of 2 tokens
            q = zeros(2 * n, num_heads, head_dim)
            cu = torch.arange(0, 2 * n + 1, 2, dtype=torch.int32, device=dev)
            lens = torch.full((n,), 2, dtype=torch.int32, device=dev)
            tables = zeros(n, 1, dtype=torch.int32)
            kv = PagedKV(k_cache, v_cache, tables, lens, scales=scales, scores=scores)
            for window in windows:
                ops.varlen_prefill_attention(q, kv, cu, scale, window)
        q, lens = zeros(1, num_heads, head_dim), torch.ones(1, dtype=torch.int32, device=dev)
        no_slot = torch.full((1,), -1, dtype=torch.int64, device=dev)  # nothing is stored
        kv = PagedKV(
            k_cache, v_cache, zeros(1, 1, dtype=torch.int32), lens, no_slot, scales, scores
        )
        fused = fused_qkv is not None and ops.paged_decode_qkv is not None
        if fused:  # one decode of a token whose slot is -1
            heads = HeadLayout(num_heads, k_cache.shape[2], head_dim)
            qkv = zeros(1, heads.qkv_width)
            weight = zeros(head_dim) if fused_qkv[0] else None
            cos_sin = zeros(1, head_dim, dtype=torch.float32) if fused_qkv[1] else None
            qk = QKNormRope(weight, weight, 1e-6, cos_sin)
        for splits in (1 << i for i in range(MAX_SPLITS.bit_length())):
            for window in windows:
                ops.paged_decode_attention(q, kv, scale, window, splits)
                if fused:
                    ops.paged_decode_qkv(qkv, no_slot + 1, heads, qk, kv, scale, window, splits)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
