"""ModelRunner: a scheduled step -> flat tokens + AttentionMetadata -> the model -> logits.

It owns the model (transformed by kiln.engine.fuse when asked), the KV pool (sized from free
GPU memory after a profiling forward, or a fixed budget on CPU), the attention backend, and
the CUDA graphs of decode-only steps (kiln.engine.cuda_graphs). The kernels they all run are
one Ops (kiln.engine.ops), chosen here at start-up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from kiln.engine.attention import AttentionMetadata, KVCache, PagedBackend
from kiln.engine.config import CPU_KV_CACHE_BYTES, EngineConfig
from kiln.engine.cuda_graphs import CudaGraphRunner, graph_batch_sizes
from kiln.engine.fuse import fuse_model
from kiln.engine.ops import choose_ops
from kiln.engine.sampler import PendingSample
from kiln.engine.scheduler import SchedulerOutput
from kiln.engine.sequence import Sequence
from kiln.engine.transfer import to_device
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
        self.graph_runner = CudaGraphRunner(
            self.model, self.backend, self.ops, self.max_blocks_per_seq
        )
        # Only the Triton ops are capturable (the references read lengths on the host), and
        # MoE routing reads the chosen experts on the host.
        triton_cuda = self.device.type == "cuda" and self.ops.name == "triton"
        if config.use_cuda_graph and triton_cuda and not mc.num_experts:
            top = min(config.max_cuda_graph_batch_size, config.max_num_seqs)
            self.graph_runner.capture(graph_batch_sizes(top))
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
        graphs = self.graph_runner
        size = graphs.batch_size(b) if num_decodes == b else None
        if size is not None:
            temps = seeds = None
            in_graph = (
                sampler is not None and graphs.sample_in_graph and len(sample_seqs) == b
                and sampler.fast_path_ok(sample_seqs)
            )  # fmt: skip
            if in_graph:
                temps, seeds = sampler.fast_path_inputs(sample_seqs)
            args = (input_ids, positions, slots, context_lens, tables, pend_dst, pend_src)
            ids, md = graphs.stage(size, prev, *args, temps, seeds)
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
        graph_bs = self.graph_runner.batch_size(batch) if md.num_decodes == batch else None
        if graph_bs is not None:  # the inputs are staged in the graph's buffers already
            logits, sampled = self.graph_runner.replay(graph_bs, batch)
            if in_graph:
                return sample_seqs, None, PendingSample(*sampled)
            return sample_seqs, logits if index is None else logits[index], None
        self.backend.set_metadata(md)
        hidden = self.model.hidden_states(ids, md.positions, self.backend)
        hidden = hidden if index is None else hidden[index]
        return sample_seqs, self.model.compute_logits(hidden), None
