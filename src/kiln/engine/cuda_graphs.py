"""CudaGraphRunner: the CUDA graphs of decode-only steps, their static inputs and outputs.

One graph per batch size (1, 2, 4, 8, 16, 32, ... up to max_cuda_graph_batch_size), all
captured over the same input buffers: a step of b decodes replays the smallest graph of at
least b rows, with rows b.. padded (no KV store, context length 1). Each graph computes every
row's logits and, when the graphs sample (`sample_in_graph`), the fused sampling op's (tokens,
logprobs) from temperatures and noise seeds staged with the inputs, so that a step needs no
launch of its own beyond the replay.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

from kiln.engine.attention import AttentionMetadata, PagedBackend
from kiln.engine.ops import Ops
from kiln.engine.transfer import copy_to_device, to_device
from kiln.model.transformer import Transformer

log = logging.getLogger("kiln.engine")


def graph_batch_sizes(top: int) -> list[int]:
    """The batch sizes to capture: 1, 2, 4, 8, then every 16 up to `top` (and `top`)."""
    sizes = [s for s in (1, 2, 4, 8) if s < top] + list(range(16, top, 16))
    return sorted(set(sizes + [top]))


class CudaGraphRunner:
    # Graph steps copy their block-table rows at full width (max_blocks) with the other int32
    # inputs when size x max_blocks is at most this many values; else only their own columns.
    TABLE_COPY_LIMIT = 65536

    def __init__(
        self, model: Transformer, backend: PagedBackend, ops: Ops, max_blocks_per_seq: int
    ):
        self.model, self.backend, self.ops = model, backend, ops
        self.max_blocks = max_blocks_per_seq
        self.device = backend.kv_cache.data.device
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # by batch size, ascending
        self.logits: dict[int, torch.Tensor] = {}  # [size, vocab], each graph's output
        self.sampled: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # (tokens, logprobs)
        self.sample_in_graph = True  # the graphs run the fused sampling op too
        self.top = 0

    def batch_size(self, batch: int) -> int | None:
        """The graph that runs a decode step of `batch` rows (None: no graph is that large)."""
        for size in self.graphs:
            if size >= batch:
                return size
        return None

    def alloc_buffers(self, top: int) -> None:
        """The graphs' inputs, in two flat buffers so that a step stages them with one
        host->device copy each: int64 [ids | positions | slots | noise seeds], each `top`
        long, and int32 [cu_seqlens (top + 1, fixed) | context_lens (top) | temperatures
        (top, float32 bits) | block tables (top x max_blocks)]."""
        dev, blocks = self.device, self.max_blocks
        self.i64 = torch.zeros(4 * top, dtype=torch.long, device=dev)
        self.ids, self.positions, self.slots, self.seeds = self.i64.view(4, top)
        self.slots.fill_(-1)
        self.i32 = torch.zeros(3 * top + 1 + top * blocks, dtype=torch.int32, device=dev)
        self.cu_seqlens = self.i32[: top + 1]
        self.cu_seqlens.copy_(torch.arange(top + 1, dtype=torch.int32))
        self.context_lens = self.i32[top + 1 : 2 * top + 1].fill_(1)
        self.temperatures = self.i32[2 * top + 1 : 3 * top + 1].view(torch.float32)
        self.block_tables = self.i32[3 * top + 1 :].view(top, blocks)
        self.top = top

    def metadata(self, rows: int, width: int | None = None) -> AttentionMetadata:
        """The first `rows` rows of the input buffers as a decode step's metadata (block
        tables `width` columns wide; None: all of them)."""
        return AttentionMetadata(
            positions=self.positions[:rows],
            slot_mapping=self.slots[:rows],
            block_tables=self.block_tables[:rows, :width],
            context_lens=self.context_lens[:rows],
            cu_seqlens_q=self.cu_seqlens[: rows + 1],
            num_decodes=rows,
            query_lens=[1] * rows,
        )

    def capture(self, sizes: list[int]) -> None:
        """Capture one graph per batch size (largest first: the smaller ones share its
        memory pool)."""
        self.alloc_buffers(sizes[-1])
        pool = None
        with torch.inference_mode():
            for size in reversed(sizes):
                md = self.metadata(size)
                self.backend.set_metadata(md)
                run = functools.partial(self.body, size, md)
                run()  # compile and warm up outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[size], self.sampled[size] = run()
                pool = graph.pool() if pool is None else pool
                self.graphs[size] = graph
        self.graphs = dict(sorted(self.graphs.items()))
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for decode batch sizes %s", list(self.graphs))

    def body(self, size: int, md: AttentionMetadata):
        """What a decode graph of `size` rows computes: every row's logits and, where the
        graphs sample (sample_in_graph), the fused op's (tokens, logprobs) from the staged
        temperatures and seeds."""
        model = self.model
        logits = model.compute_logits(
            model.hidden_states(self.ids[:size], md.positions, self.backend)
        )
        sampled = None
        if self.sample_in_graph:
            sampled = self.ops.sample(logits, self.temperatures[:size], self.seeds[:size])
        return logits, sampled

    def stage(
        self, size, prev, input_ids, positions, slots, context_lens, tables, pend_dst, pend_src,
        temps=None, seeds=None,
    ):  # fmt: skip
        """Write a decode step of b <= size sequences into the input buffers (rows b..size-1
        padded: no KV store, context length 1), with the sampling temperatures and seeds when
        the graph samples; returns (ids, metadata) as views.

        Two pinned host->device copies: the int64 buffer whole (4 x top values), and the int32
        one up to the size-row tables (their rows are max_blocks wide; past TABLE_COPY_LIMIT
        values only the step's own columns are copied, in a second step). Input ids still in
        flight come from `prev` (PreviousTokens) on the device."""
        top, b, blocks = self.top, len(tables), self.max_blocks
        host64 = np.zeros((4, top), dtype=np.int64)
        host64[0, :b], host64[1, :b] = input_ids, positions
        host64[2] = -1
        host64[2, :b] = slots
        if seeds is not None:
            host64[3, :b] = seeds
        copy_to_device(self.i64, host64.ravel())
        width = max(len(t) for t in tables)
        full_rows = size * blocks <= self.TABLE_COPY_LIMIT
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
        copy_to_device(self.i32[top + 1 : top + 1 + n32], host32)
        if not full_rows:
            padded = np.zeros((size, width), dtype=np.int32)
            for r, t in enumerate(tables):
                padded[r, : len(t)] = t
            self.block_tables[:size, :width] = to_device(padded, torch.int32, self.device)
        ids = self.ids[:b]
        if pend_dst:
            n = len(pend_dst)
            if pend_dst == pend_src == list(range(n)):  # the usual case: one copy
                ids[:n] = prev.tokens[:n]
            else:
                idx = to_device([pend_dst, pend_src], torch.int64, self.device)
                ids[idx[0]] = prev.tokens[idx[1]]
        return ids, self.metadata(b, width)

    def replay(self, size: int, batch: int):
        """Replay the graph of `size` rows over the staged inputs: the first `batch` rows'
        logits [batch, vocab] and, where it samples, their (tokens, logprobs) (else None)."""
        self.graphs[size].replay()
        sampled = self.sampled[size]
        if sampled is not None:
            sampled = (sampled[0][:batch], sampled[1][:batch])
        return self.logits[size][:batch], sampled
