"""ModelRunner: a scheduled step -> flat tokens + AttentionMetadata -> the model -> logits.

It owns the model (transformed by kiln.engine.fuse when asked), the KV pool (sized from free
GPU memory after a profiling forward, or a fixed budget on CPU), the attention backend, and
the CUDA graphs captured for decode-only steps of 1, 2, 4, 8, 16, 24, ... sequences. The
kernels they all run are one Ops (kiln.engine.ops), chosen here at start-up.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch

from kiln.engine.attention import AttentionMetadata, KVCache, PagedBackend
from kiln.engine.config import CPU_KV_CACHE_BYTES, EngineConfig
from kiln.engine.fuse import fuse_model
from kiln.engine.ops import choose_ops
from kiln.engine.sampler import PendingSample
from kiln.engine.scheduler import SchedulerOutput
from kiln.engine.sequence import Sequence
from kiln.engine.transfer import copy_to_device, to_device
from kiln.errors import ConfigError
from kiln.model.attention import causal_attention
from kiln.model.transformer import Transformer

log = logging.getLogger("kiln.engine")


class ProfileBackend:
    """Attention over the flat token list as one causal sequence (for the profiling forward)."""

    def attend(self, layer_idx, q, k, v, scale, sliding_window):
        return causal_attention(q[None], k[None], v[None], scale, 0, sliding_window)[0]


@dataclass
class PreviousTokens:
    """The previous step's sampled tokens, still on the device, and each sequence's row."""

    tokens: torch.Tensor  # [S] int64
    rows: dict[int, int]  # seq_id -> row of tokens


class ModelRunner:
    # Graph steps copy their block-table rows at full width (max_blocks) with the other int32
    # inputs when size x max_blocks is at most this many values; else only their own columns.
    GRAPH_TABLE_COPY_LIMIT = 65536

    def __init__(self, model: Transformer, config: EngineConfig, max_model_len: int):
        self.config = config
        self.model_config = model.config
        self.max_model_len = max_model_len
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.block_size = config.block_size
        self.max_blocks_per_seq = -(-max_model_len // config.block_size)
        self.ops = choose_ops(config.attention_backend, self.device)
        if config.fuse_weights:
            model = fuse_model(model, self.ops, config.gemv_max_batch)
        self.model = model
        self.num_blocks = self._num_kv_blocks()
        mc = self.model_config
        self.kv_cache = KVCache(
            mc.num_layers,
            self.num_blocks,
            self.block_size,
            mc.num_kv_heads,
            mc.head_dim,
            self.dtype,
            self.device,
        )
        self.backend = PagedBackend(self.kv_cache, self.ops)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # Only the Triton ops are capturable (the references read lengths on the host), and
        # MoE routing reads the chosen experts on the host.
        triton_cuda = self.device.type == "cuda" and self.ops.name == "triton"
        graphs_ok = triton_cuda and not mc.num_experts
        # Decode graphs also run the fused sampling kernel (used by execute_and_sample).
        self.sample_in_graph = graphs_ok and config.use_cuda_graph
        if config.use_cuda_graph and graphs_ok:
            self._capture_graphs()
        if triton_cuda:
            windows = {m.sliding_window for m in model.modules() if hasattr(m, "sliding_window")}
            fused = None  # (q/k norm, RoPE) of a fused model: its decode_qkv variants too
            if config.fuse_weights:
                fused = (mc.qk_norm, mc.position_embedding != "learned")
            self.backend.compile_kernels(
                mc.num_heads, windows, config.max_num_seqs, fused_qkv=fused
            )

    # ------------------------------------------------------------------ KV pool size

    def _num_kv_blocks(self) -> int:
        mc, cfg = self.model_config, self.config
        per_block = KVCache.bytes_per_block(
            mc.num_layers, self.block_size, mc.num_kv_heads, mc.head_dim, self.dtype
        )
        if cfg.num_kv_blocks is not None:
            num_blocks = cfg.num_kv_blocks
        elif cfg.kv_cache_memory_bytes is not None:
            num_blocks = cfg.kv_cache_memory_bytes // per_block
        elif self.device.type != "cuda":
            num_blocks = CPU_KV_CACHE_BYTES // per_block
        else:
            num_blocks = int(self._profile_free_bytes() // per_block)
        if num_blocks < self.max_blocks_per_seq:
            need = self.max_blocks_per_seq * per_block
            raise ConfigError(
                f"the KV cache holds {max(num_blocks, 0)} blocks "
                f"({max(num_blocks, 0) * self.block_size} tokens, "
                f"{max(num_blocks, 0) * per_block / 2**20:.1f} MiB), too few for one "
                f"{self.max_model_len}-token sequence, which needs {self.max_blocks_per_seq} blocks"
                f" ({need / 2**20:.1f} MiB): give more memory (gpu_memory_utilization, "
                f"kv_cache_memory_bytes) or lower max_model_len"
            )
        log.info(
            "KV cache: %d blocks x %d = %d tokens (%.2f GiB, %s)",
            num_blocks, self.block_size, num_blocks * self.block_size,
            num_blocks * per_block / 2**30, self.device,
        )  # fmt: skip
        return num_blocks

    @torch.inference_mode()
    def _profile_free_bytes(self) -> float:
        """Bytes left for the KV pool after a forward of a full token budget."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        n = self.config.max_num_batched_tokens
        ids = torch.randint(0, self.model_config.vocab_size, (n,), device=self.device)
        positions = torch.arange(n, device=self.device) % self.max_model_len
        hidden = self.model.hidden_states(ids, positions, ProfileBackend())
        rows = min(self.config.max_num_seqs, n)
        logits = self.model.compute_logits(hidden[:rows]).float()
        del hidden, logits
        torch.cuda.synchronize()
        activations = torch.cuda.max_memory_allocated() - base
        sampler = 6 * self.config.max_num_seqs * self.model_config.vocab_size * 4  # float32 copies
        free, total = torch.cuda.mem_get_info()
        budget = total * self.config.gpu_memory_utilization - (total - free)
        return budget - activations - sampler

    # ------------------------------------------------------------------ one step

    def prepare(self, out: SchedulerOutput, prev: PreviousTokens | None = None, sampler=None):
        """Flat input ids, positions and metadata (one-token rows first), the rows to sample
        (a device index, or None for all), their sequences, and whether the step's CUDA graph
        samples them too (given a sampler, for a graph step whose rows all sample on the fused
        kernel's terms: their temperatures and noise seeds are staged with the inputs).

        A decode whose input token is still in flight (async scheduling) reads it from
        `prev`, the previous step's sampled tokens on the device.
        """
        bs = self.block_size
        order = sorted(range(len(out)), key=lambda i: out.num_new_tokens[i] != 1)
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens, context_lens, tables = [], [], []
        logits_indices, sample_seqs = [], []
        pend_dst, pend_src = [], []
        for i in order:
            seq, n = out.seqs[i], out.num_new_tokens[i]
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            table = seq.block_table
            if n == 1:  # decode: plain ints beat numpy on one element
                if start < len(seq.token_ids):
                    input_ids.append(seq.token_ids[start])
                else:  # sampled last step, not read back yet
                    pend_dst.append(len(input_ids))
                    pend_src.append(prev.rows[seq.seq_id])
                    input_ids.append(0)
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                input_ids.extend(seq.token_ids[start:end])
                pos = np.arange(start, end)
                positions.extend(pos.tolist())
                slots.extend((np.asarray(table)[pos // bs] * bs + pos % bs).tolist())
            query_lens.append(n)
            context_lens.append(end)
            tables.append(table)
            if end == len(seq):
                logits_indices.append(len(input_ids) - 1)
                sample_seqs.append(seq)
        num_decodes = sum(1 for n in query_lens if n == 1)
        b = len(tables)
        size = self._graph_batch_size(b) if num_decodes == b else None
        if size is not None:
            temps = seeds = None
            in_graph = (
                sampler is not None and self.sample_in_graph and len(sample_seqs) == b
                and sampler.fast_path_ok(sample_seqs)
            )  # fmt: skip
            if in_graph:
                temps, seeds = sampler.fast_path_inputs(sample_seqs)
            args = (input_ids, positions, slots, context_lens, tables, pend_dst, pend_src)
            ids, md = self._stage_graph_inputs(size, prev, *args, temps, seeds)
            index = None
            if len(logits_indices) < b:
                index = to_device(logits_indices, torch.int64, self.device)
            return ids, md, index, sample_seqs, in_graph
        width = max(len(t) for t in tables)
        padded = np.zeros((len(tables), width), dtype=np.int64)
        for r, t in enumerate(tables):
            padded[r, : len(t)] = t
        # One host buffer, one (pinned, asynchronous on CUDA) copy for the whole step.
        n_tok = len(input_ids)
        every_row = len(logits_indices) == n_tok
        if every_row:
            logits_indices = []
        n_idx, n_pend = len(logits_indices), len(pend_dst)
        parts = [input_ids, positions, slots, logits_indices, pend_dst, pend_src, context_lens]
        parts += [np.cumsum([0, *query_lens]), padded.ravel()]
        dev = to_device(np.concatenate(parts).astype(np.int64), torch.int64, self.device)
        ids, pos_d, slot_d = dev[:n_tok], dev[n_tok : 2 * n_tok], dev[2 * n_tok : 3 * n_tok]
        at = 3 * n_tok
        index = None if every_row else dev[at : at + n_idx]
        at += n_idx
        if n_pend:
            dst, src = dev[at : at + n_pend], dev[at + n_pend : at + 2 * n_pend]
            ids[dst] = prev.tokens[src]
        rest = dev[at + 2 * n_pend :].to(torch.int32)
        md = AttentionMetadata(
            positions=pos_d,
            slot_mapping=slot_d,
            block_tables=rest[2 * b + 1 :].view(b, width),
            context_lens=rest[:b],
            cu_seqlens_q=rest[b : 2 * b + 1],
            num_decodes=num_decodes,
            query_lens=query_lens,
        )
        return ids, md, index, sample_seqs, False

    @torch.inference_mode()
    def execute(
        self, out: SchedulerOutput, prev: PreviousTokens | None = None
    ) -> tuple[list[Sequence], torch.Tensor | None]:
        """Queue the step on the device; logits [S, vocab] for the S sequences that reach
        their last token (nothing here waits for the GPU)."""
        seqs, logits, _ = self._run(out, prev, None)
        return seqs, logits

    @torch.inference_mode()
    def execute_and_sample(
        self, out: SchedulerOutput, prev: PreviousTokens | None, sampler
    ) -> tuple[list[Sequence], PendingSample | None]:
        """execute() and sampler.sample() in one: a decode step that its CUDA graph can sample
        (the fused sampling kernel's terms) is sampled there, with no launch of its own."""
        seqs, logits, sampled = self._run(out, prev, sampler)
        if sampled is None and seqs:
            sampled = sampler.sample(logits, seqs)
        return seqs, sampled

    def _run(self, out, prev, sampler):
        self.kv_cache.copy_blocks(out.block_copies)
        ids, md, index, sample_seqs, in_graph = self.prepare(out, prev, sampler)
        batch = len(md.query_lens)
        graph_bs = self._graph_batch_size(batch) if md.num_decodes == batch else None
        if graph_bs is not None:  # the inputs are staged in the graph's buffers already
            self.graphs[graph_bs].replay()
            if in_graph:
                tokens, token_lp = self.g_sampled[graph_bs]
                return sample_seqs, None, PendingSample(tokens[:batch], token_lp[:batch])
            logits = self.g_logits[graph_bs][:batch]
            return sample_seqs, logits if index is None else logits[index], None
        self.backend.set_metadata(md)
        hidden = self.model.hidden_states(ids, md.positions, self.backend)
        hidden = hidden if index is None else hidden[index]
        return sample_seqs, self.model.compute_logits(hidden), None

    # ------------------------------------------------------------------ CUDA graphs

    def _graph_sizes(self) -> list[int]:
        top = min(self.config.max_cuda_graph_batch_size, self.config.max_num_seqs)
        sizes = [s for s in (1, 2, 4, 8) if s < top] + list(range(16, top, 16))
        return sorted(set(sizes + [top]))

    def _graph_batch_size(self, batch: int) -> int | None:
        for size in self.graphs:
            if size >= batch:
                return size
        return None

    def _alloc_graph_buffers(self, top: int) -> None:
        """The graphs' inputs, in two flat buffers so that a step stages them with one
        host->device copy each: int64 [ids | positions | slots | noise seeds], each `top`
        long, and int32 [cu_seqlens (top + 1, fixed) | context_lens (top) | temperatures
        (top, float32 bits) | block tables (top x max_blocks)]."""
        dev, blocks = self.device, self.max_blocks_per_seq
        self.g_i64 = torch.zeros(4 * top, dtype=torch.long, device=dev)
        self.g_ids, self.g_positions, self.g_slots, self.g_seeds = self.g_i64.view(4, top)
        self.g_slots.fill_(-1)
        self.g_i32 = torch.zeros(3 * top + 1 + top * blocks, dtype=torch.int32, device=dev)
        self.g_cu = self.g_i32[: top + 1]
        self.g_cu.copy_(torch.arange(top + 1, dtype=torch.int32))
        self.g_context_lens = self.g_i32[top + 1 : 2 * top + 1].fill_(1)
        self.g_temps = self.g_i32[2 * top + 1 : 3 * top + 1].view(torch.float32)
        self.g_tables = self.g_i32[3 * top + 1 :].view(top, blocks)
        self.g_top = top

    def _capture_graphs(self) -> None:
        sizes = self._graph_sizes()
        top = sizes[-1]
        self._alloc_graph_buffers(top)
        self.g_logits: dict[int, torch.Tensor] = {}
        self.g_sampled: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        pool = None
        with torch.inference_mode():
            for size in reversed(sizes):
                md = AttentionMetadata(
                    positions=self.g_positions[:size], slot_mapping=self.g_slots[:size],
                    block_tables=self.g_tables[:size], context_lens=self.g_context_lens[:size],
                    cu_seqlens_q=self.g_cu[: size + 1], num_decodes=size,
                    query_lens=[1] * size,
                )  # fmt: skip
                self.backend.set_metadata(md)
                run = functools.partial(self._graph_body, size, md)
                run()  # compile and warm up outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.g_logits[size], self.g_sampled[size] = run()
                pool = graph.pool() if pool is None else pool
                self.graphs[size] = graph
        self.graphs = dict(sorted(self.graphs.items()))
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for decode batch sizes %s", list(self.graphs))

    def _forward_all(self, ids: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        """Logits of every row."""
        return self.model.compute_logits(self.model.hidden_states(ids, md.positions, self.backend))

    def _graph_body(self, size: int, md: AttentionMetadata):
        """What a decode graph of `size` rows computes: every row's logits and, where the
        graph samples (sample_in_graph), the fused kernel's (tokens, logprobs) from the staged
        temperatures and seeds."""
        logits = self._forward_all(self.g_ids[:size], md)
        sampled = None
        if self.sample_in_graph:
            sampled = self.ops.sample(logits, self.g_temps[:size], self.g_seeds[:size])
        return logits, sampled

    def _stage_graph_inputs(
        self, size, prev, input_ids, positions, slots, context_lens, tables, pend_dst, pend_src,
        temps=None, seeds=None,
    ):  # fmt: skip
        """Write a decode step of b <= size sequences into the graphs' input buffers (rows b..
        size-1 padded: no KV store, context length 1), with the sampling temperatures and
        seeds when the graph samples; returns (ids, metadata) as views.

        Two pinned host->device copies: the int64 buffer whole (4 x top values), and the int32
        one up to the size-row tables (their rows are max_blocks wide; past
        GRAPH_TABLE_COPY_LIMIT values only the step's own columns are copied, in a second
        step). Input ids still in flight come from `prev` on the device."""
        top, b, blocks = self.g_top, len(tables), self.max_blocks_per_seq
        host64 = np.zeros((4, top), dtype=np.int64)
        host64[0, :b], host64[1, :b] = input_ids, positions
        host64[2] = -1
        host64[2, :b] = slots
        if seeds is not None:
            host64[3, :b] = seeds
        copy_to_device(self.g_i64, host64.ravel())
        width = max(len(t) for t in tables)
        full_rows = size * blocks <= self.GRAPH_TABLE_COPY_LIMIT
        n32 = 2 * top + (size * blocks if full_rows else 0)  # from context_lens on
        host32 = np.zeros(n32, dtype=np.int32)
        host32[:top] = 1
        host32[:b] = context_lens
        if temps is not None:
            host32[top : top + b] = np.asarray(temps, dtype=np.float32).view(np.int32)
        if full_rows:
            rows = host32[2 * top :].reshape(size, blocks)
            for r, t in enumerate(tables):
                rows[r, : len(t)] = t
        copy_to_device(self.g_i32[top + 1 : top + 1 + n32], host32)
        if not full_rows:
            padded = np.zeros((size, width), dtype=np.int32)
            for r, t in enumerate(tables):
                padded[r, : len(t)] = t
            self.g_tables[:size, :width] = to_device(padded, torch.int32, self.device)
        ids = self.g_ids[:b]
        if pend_dst:
            n = len(pend_dst)
            if pend_dst == pend_src == list(range(n)):  # the usual case: one copy
                ids[:n] = prev.tokens[:n]
            else:
                idx = to_device([pend_dst, pend_src], torch.int64, self.device)
                ids[idx[0]] = prev.tokens[idx[1]]
        md = AttentionMetadata(
            positions=self.g_positions[:b],
            slot_mapping=self.g_slots[:b],
            block_tables=self.g_tables[:b, :width],
            context_lens=self.g_context_lens[:b],
            cu_seqlens_q=self.g_cu[: b + 1],
            num_decodes=b,
            query_lens=[1] * b,
        )
        return ids, md
