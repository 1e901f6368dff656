"""CudaGraphRunner: the CUDA graphs of engine steps, their static inputs and outputs.

Decode graphs: one per batch size (1, 2, 4, 8, 16, 32, ... up to max_cuda_graph_batch_size),
all captured over the same input buffers: a step of b decodes replays the smallest graph of at
least b rows, with rows b.. padded (no KV store, context length 1), through the split-KV paged
decode kernels.

Mixed graphs: one per token count (16, 32, ... up to max_cuda_graph_tokens), for steps that
carry prefill tokens (with or without decodes) — under a steady stream of arrivals nearly every
step does, and an eager step of a small model is bound by the host's kernel launches, not the
GPU. Every sequence of such a step goes through the varlen prefill kernel (a decode is a
one-token chunk); the graph of T tokens has room for min(T, max_num_seqs) sequences: padded
sequences are empty (their tiles exit at once), padded tokens belong to none (no KV store, their
rows are never read). It computes the logits of the rows that sample only, gathered by a staged
index.

Each graph computes its logits and, when the graphs sample (`sample_in_graph`), the fused
sampling op's (tokens, logprobs) from temperatures and noise seeds staged with the inputs, so
that a step needs no launch of its own beyond the replay. For the hidden-state drafts
(kiln.engine.spec_decode.hidden) a graph also writes every token's hidden state into
`hidden_slots` (padded tokens into its spare row) and/or returns the sampling rows' hidden
states (`keep_rows`).
"""

from __future__ import annotations

import functools
import itertools
import logging
import operator

import numpy as np
import torch

from kiln.engine.attention import AttentionMetadata, HiddenSlots, PagedBackend
from kiln.engine.ops import Ops
from kiln.engine.transfer import copy_to_device, to_device
from kiln.model.transformer import Transformer

log = logging.getLogger("kiln.engine")


def graph_batch_sizes(top: int) -> list[int]:
    """The batch sizes to capture: 1, 2, 4, 8, then every 16 up to `top` (and `top`)."""
    sizes = [s for s in (1, 2, 4, 8) if s < top] + list(range(16, top, 16))
    return sorted(set(sizes + [top]))


def mixed_token_sizes(top: int) -> list[int]:
    """The token counts of mixed-step graphs: every 16 up to 256, every 32 up to 512, every
    64 up to 1024, then every 128, up to `top` (rounded up to 16); none when top < 2."""
    if top < 2:
        return []
    top = -(-top // 16) * 16
    sizes = [*range(16, 257, 16), *range(288, 513, 32), *range(576, 1025, 64)]
    sizes += range(1152, top + 1, 128)
    return sorted({s for s in sizes if s < top} | {top})


def _smallest_at_least(graphs: dict[int, object], n: int) -> int | None:
    """The smallest key of `graphs` (ascending) that is at least n; None if none is."""
    return next((size for size in graphs if size >= n), None)


def write_rows(dst: np.ndarray, tables: list[list[int]]) -> None:
    """Block tables into the rows of a zeroed host array (one flat conversion of the values
    and a masked store: a store per row costs more than a whole table of values)."""
    if not tables:
        return
    lens = np.fromiter(map(len, tables), np.int64, len(tables))
    width = int(lens.max())
    values = np.fromiter(itertools.chain.from_iterable(tables), dst.dtype, int(lens.sum()))
    dst[: len(tables), :width][np.arange(width) < lens[:, None]] = values


def _capture(run, pool) -> tuple[torch.cuda.CUDAGraph, object, object]:
    """(graph, its outputs, the pool) of `run` captured in memory pool `pool` (None: a new
    one, returned for the next capture to share), after one warm-up run outside the capture
    (Triton compiles there)."""
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = run()
    return graph, outputs, pool if pool is not None else graph.pool()


class TableRows:
    """Block-table rows kept on the host across steps (a graph's staged tables): row i holds
    the table of the step's i-th sequence, zeros past its length, and rows past the step's
    sequences are zeros. A step rewrites only the rows whose table changed since the last
    one (a block appended or replaced, another sequence in the row), in one masked store;
    most decode steps append a block to a few sequences only."""

    def __init__(self, array: np.ndarray):
        self.array = array  # [rows, max_blocks] int32, a view into the host staging buffer
        self._held: list[list[int]] = [[]] * len(array)  # copies of what each row holds
        self._used = 0  # rows that may hold a table

    def write(self, tables: list[list[int]]) -> list[int]:
        """Rows 0..len(tables)-1 hold `tables`, the rest zeros; the rows rewritten."""
        held, n = self._held, len(tables)
        changed = list(itertools.compress(range(n), map(operator.ne, tables, held)))
        if changed:
            new = [tables[i] for i in changed]
            width = max(max(map(len, new)), max(len(held[i]) for i in changed))
            rows = np.zeros((len(new), width), dtype=self.array.dtype)
            write_rows(rows, new)
            self.array[changed, :width] = rows
            for i, table in zip(changed, new):
                held[i] = table.copy()
        if self._used > n:
            self.array[n : self._used] = 0
            held[n : self._used] = [[]] * (self._used - n)
        self._used = n
        return changed


class MixedBuffers:
    """The mixed graphs' inputs, in two flat buffers (one host->device copy each): int64
    [ids | positions | slots (T each) | logits rows | noise seeds (S each)], int32 [cu_seqlens
    (S + 1) | context_lens (S) | temperatures (S, float32 bits) | block tables (S x blocks)],
    for at most T tokens and S sequences."""

    def __init__(self, tokens: int, seqs: int, blocks: int, device: torch.device):
        self.tokens, self.seqs, self.blocks = tokens, seqs, blocks
        self.i64 = torch.zeros(3 * tokens + 2 * seqs, dtype=torch.long, device=device)
        self.ids, self.positions, self.slots = self.i64[: 3 * tokens].view(3, tokens)
        self.slots.fill_(-1)
        self.rows, self.seeds = self.i64[3 * tokens :].view(2, seqs)
        self.i32 = torch.zeros(3 * seqs + 1 + seqs * blocks, dtype=torch.int32, device=device)
        self.cu_seqlens = self.i32[: seqs + 1]
        self.context_lens = self.i32[seqs + 1 : 2 * seqs + 1]
        self.temperatures = self.i32[2 * seqs + 1 : 3 * seqs + 1].view(torch.float32)
        self.block_tables = self.i32[3 * seqs + 1 :].view(seqs, blocks)
        # the int32 buffer's host side, kept across steps for its block-table rows
        self.host32 = np.zeros(self.i32.numel(), dtype=np.int32)
        self.table_rows = TableRows(self.host32[3 * seqs + 1 :].reshape(seqs, blocks))

    def metadata(self, tokens: int, seqs: int, width: int | None = None) -> AttentionMetadata:
        """The first `tokens` tokens and `seqs` sequences as a step of packed decodes and
        prefill chunks, which is which found on the device (varlen_decodes)."""
        return AttentionMetadata(
            positions=self.positions[:tokens],
            slot_mapping=self.slots[:tokens],
            block_tables=self.block_tables[:seqs, :width],
            context_lens=self.context_lens[:seqs],
            cu_seqlens_q=self.cu_seqlens[: seqs + 1],
            num_decodes=0,
            query_lens=[0] * seqs,
            varlen_decodes=True,
        )


class CudaGraphRunner:
    # Graph steps copy their block-table rows at full width (max_blocks) with the other int32
    # inputs when size x max_blocks is at most this many values; else only their own columns.
    TABLE_COPY_LIMIT = 65536

    def __init__(
        self,
        model: Transformer,
        backend: PagedBackend,
        ops: Ops,
        max_blocks_per_seq: int,
        max_num_seqs: int = 256,
    ):
        self.model, self.backend, self.ops = model, backend, ops
        self.max_blocks = max_blocks_per_seq
        self.max_num_seqs = max_num_seqs
        self.device = backend.kv_cache.data.device
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # decode, by batch size, ascending
        self.logits: dict[int, torch.Tensor] = {}  # [size, vocab], each graph's output
        self.sampled: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # (tokens, logprobs)
        self.hidden: dict[int, torch.Tensor | None] = {}  # [size, H] where keep_rows
        self.mixed: dict[int, torch.cuda.CUDAGraph] = {}  # mixed, by token count, ascending
        self.mixed_logits: dict[int, torch.Tensor] = {}  # [seqs, vocab]: the sampling rows'
        self.mixed_sampled: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.mixed_hidden: dict[int, torch.Tensor | None] = {}  # [seqs, H]: sampling rows'
        self.mixed_buffers: MixedBuffers | None = None
        self.sample_in_graph = True  # the graphs run the fused sampling op too
        self.hidden_slots: HiddenSlots | None = None  # every token's hidden state goes here
        self.keep_rows = False  # the graphs return the sampling rows' hidden states too
        self.top = 0
        self._pool = None  # the memory pool every graph shares (the first one's)
        # structured outputs: per graph, one more graph that samples its logits under a
        # token bitmask staged in mask_buffer (captured on a grammar step's first use)
        self.mask_graphs: dict[tuple[str, int], tuple] = {}
        self.mask_buffer: torch.Tensor | None = None  # [rows, words] int32, -1: all allowed
        self._mask_pool = None  # theirs (outputs never alias the forward graphs' memory)

    def batch_size(self, batch: int) -> int | None:
        """The graph that runs a decode step of `batch` rows (None: no graph is that large)."""
        return _smallest_at_least(self.graphs, batch)

    def mixed_size(self, tokens: int, seqs: int) -> int | None:
        """The mixed graph that runs a step of `tokens` tokens over `seqs` sequences (None:
        none is that large)."""
        size = _smallest_at_least(self.mixed, tokens)
        return size if size is not None and seqs <= self.mixed_seqs(size) else None

    def mixed_seqs(self, tokens: int) -> int:
        """The sequences a mixed graph of `tokens` tokens has room for."""
        return min(tokens, self.max_num_seqs)

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
        # the int32 buffer's host side from context_lens on, kept across steps for its
        # block-table rows
        self.host32 = np.zeros(2 * top + top * blocks, dtype=np.int32)
        self.table_rows = TableRows(self.host32[2 * top :].reshape(top, blocks))
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

    def alloc_mixed_buffers(self, top: int) -> None:
        self.mixed_buffers = MixedBuffers(top, self.mixed_seqs(top), self.max_blocks, self.device)

    def capture(self, sizes: list[int], token_sizes: list[int] = ()) -> None:
        """Capture one decode graph per batch size and one mixed graph per token count
        (largest first: the smaller ones share the first one's memory pool)."""
        self._pool = None
        if token_sizes:
            self.alloc_mixed_buffers(token_sizes[-1])
            for size in reversed(token_sizes):
                md = self.mixed_buffers.metadata(size, self.mixed_seqs(size))
                graph, outputs = self._capture_one(md, functools.partial(self.body_mixed, size, md))
                self.mixed[size] = graph
                self.mixed_logits[size], self.mixed_sampled[size], self.mixed_hidden[size] = outputs
            self.mixed = dict(sorted(self.mixed.items()))
            log.info("captured CUDA graphs for mixed steps of %s tokens", list(self.mixed))
        if sizes:
            self.alloc_buffers(sizes[-1])
            for size in reversed(sizes):
                md = self.metadata(size)
                graph, outputs = self._capture_one(md, functools.partial(self.body, size, md))
                self.graphs[size] = graph
                self.logits[size], self.sampled[size], self.hidden[size] = outputs
            self.graphs = dict(sorted(self.graphs.items()))
            log.info("captured CUDA graphs for decode batch sizes %s", list(self.graphs))
        torch.cuda.synchronize()

    @torch.inference_mode()
    def _capture_one(self, md: AttentionMetadata, run):
        """(graph, its outputs) of `run` over the metadata `md`, in the shared memory pool."""
        self.backend.set_metadata(md)
        graph, outputs, self._pool = _capture(run, self._pool)
        return graph, outputs

    def body(self, size: int, md: AttentionMetadata):
        """What a decode graph of `size` rows computes: every row's logits, where the graphs
        sample (sample_in_graph) the fused op's (tokens, logprobs) from the staged
        temperatures and seeds, and where asked every row's hidden state (keep_rows)."""
        hidden = self._hidden(self.ids[:size], md)
        logits = self.model.compute_logits(hidden)
        sampled = None
        if self.sample_in_graph:
            sampled = self.ops.sample(logits, self.temperatures[:size], self.seeds[:size])
        return logits, sampled, hidden if self.keep_rows else None

    def _hidden(self, ids: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        """The model's hidden states [N, H], each stored at its slot where hidden_slots is set."""
        hidden = self.model.hidden_states(ids, md.positions, self.backend)
        if self.hidden_slots is not None:
            self.hidden_slots.write(md.slot_mapping, hidden)
        return hidden

    def body_mixed(self, size: int, md: AttentionMetadata):
        """What a mixed graph of `size` tokens computes: the hidden states of every token, the
        logits of the staged sampling rows (one per sequence slot; padded ones read row 0),
        where the graphs sample their (tokens, logprobs), and where asked their hidden
        states (keep_rows)."""
        buf, seqs = self.mixed_buffers, self.mixed_seqs(size)
        rows = self._hidden(buf.ids[:size], md)[buf.rows[:seqs]]
        logits = self.model.compute_logits(rows)
        sampled = None
        if self.sample_in_graph:
            sampled = self.ops.sample(logits, buf.temperatures[:seqs], buf.seeds[:seqs])
        return logits, sampled, rows if self.keep_rows else None

    def stage_mixed(self, size, prev, host, temps=None, seeds=None):
        """Write a step's flat inputs (kiln.engine.model_runner.HostInputs) into the mixed
        buffers for the graph of `size` tokens: tokens n.. padded (no KV store, owned by no
        sequence), sequences b.. empty, logits rows [the sampling rows, then 0s]; with the
        sampling temperatures and seeds when the graph samples. Returns (ids, metadata) of the
        real tokens and sequences, as views."""
        buf, seqs = self.mixed_buffers, self.mixed_seqs(size)
        top, top_seqs, blocks = buf.tokens, buf.seqs, self.max_blocks
        n, b, k = len(host.input_ids), len(host.tables), len(host.logits_indices)
        host64 = np.zeros(3 * top + 2 * top_seqs, dtype=np.int64)
        host64[:n] = host.input_ids
        host64[top : top + n] = host.positions
        host64[2 * top : 3 * top] = -1
        host64[2 * top : 2 * top + n] = host.slots
        at = 3 * top
        host64[at : at + k] = host.logits_indices
        if seeds is not None:
            host64[at + top_seqs : at + top_seqs + k] = seeds
        copy_to_device(buf.i64, host64)
        tables = host.tables
        width = max(map(len, tables))
        full_rows = seqs * blocks <= self.TABLE_COPY_LIMIT
        n32 = 3 * top_seqs + 1 + (seqs * blocks if full_rows else 0)
        host32 = buf.host32
        host32[: 3 * top_seqs + 1] = 0
        buf.table_rows.write(tables)
        cu = host32[: top_seqs + 1]
        cu[1 : b + 1] = np.cumsum(host.query_lens)
        cu[b + 1 :] = n  # the padded sequences are empty
        host32[top_seqs + 1 : top_seqs + 1 + b] = host.context_lens
        if temps is not None:
            t0 = 2 * top_seqs + 1
            host32[t0 : t0 + k] = np.asarray(temps, dtype=np.float32).view(np.int32)
        copy_to_device(buf.i32[:n32], host32[:n32])
        if not full_rows:
            self._stage_own_columns(buf.block_tables, buf.table_rows, seqs, width)
        ids = buf.ids[:n]
        self._gather_pending(ids, prev, host.pend_dst, host.pend_src)
        md = buf.metadata(n, b, width)
        md.query_lens = host.query_lens
        return ids, md

    def _stage_own_columns(self, block_tables, table_rows, rows: int, width: int) -> None:
        """Copy the first `rows` table rows, `width` columns only (tables too wide to copy at
        full width; their columns past the width are never read)."""
        own = np.ascontiguousarray(table_rows.array[:rows, :width])
        block_tables[:rows, :width] = to_device(own, torch.int32, self.device)

    def _gather_pending(self, ids, prev, pend_dst, pend_src) -> None:
        """Input ids still in flight (async scheduling): from the previous step's samples."""
        if pend_dst:
            n = len(pend_dst)
            if pend_dst == pend_src == list(range(n)):  # the usual case: one copy
                ids[:n] = prev.tokens[:n]
            else:
                idx = to_device([pend_dst, pend_src], torch.int64, self.device)
                ids[idx[0]] = prev.tokens[idx[1]]

    def stage(
        self, size, prev, input_ids, positions, slots, context_lens, tables, pend_dst, pend_src,
        temps=None, seeds=None,
    ):  # fmt: skip
        """Write a decode step of b <= size sequences into the input buffers (rows b..size-1
        padded: no KV store, context length 1), with the sampling temperatures and seeds when
        the graph samples; returns (ids, metadata) as views.

        Two pinned host->device copies: the int64 buffer whole (4 x top values), and the int32
        one up to the size-row tables (their rows are max_blocks wide; past TABLE_COPY_LIMIT
        values only the step's own columns are copied, in a second step); the tables' host
        rows persist across steps (TableRows: only changed rows are rewritten). Input ids
        still in flight come from `prev` (PreviousTokens) on the device."""
        top, b, blocks = self.top, len(tables), self.max_blocks
        host64 = np.zeros((4, top), dtype=np.int64)
        host64[0, :b], host64[1, :b] = input_ids, positions
        host64[2] = -1
        host64[2, :b] = slots
        if seeds is not None:
            host64[3, :b] = seeds
        copy_to_device(self.i64, host64.ravel())
        width = max(map(len, tables))
        full_rows = size * blocks <= self.TABLE_COPY_LIMIT
        n32 = 2 * top + (size * blocks if full_rows else 0)  # from context_lens on
        host32 = self.host32
        host32[:top] = 1
        host32[:b] = context_lens
        host32[top : 2 * top] = 0
        if temps is not None:
            host32[top : top + b] = np.asarray(temps, dtype=np.float32).view(np.int32)
        self.table_rows.write(tables)
        copy_to_device(self.i32[top + 1 : top + 1 + n32], host32[:n32])
        if not full_rows:
            self._stage_own_columns(self.block_tables, self.table_rows, size, width)
        ids = self.ids[:b]
        self._gather_pending(ids, prev, pend_dst, pend_src)
        return ids, self.metadata(b, width)

    def sample_masked(
        self, graph: tuple[str, int], batch: int, bitmask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused sampling op over the logits `graph` just computed, with the temperatures
        and seeds staged for it and the first `batch` rows under `bitmask` [batch, words]
        (kiln.engine.structured.fill_bitmask): (tokens, logprobs) [batch], from a graph of its
        own (one copy and one replay: a grammar step costs the host what a free one does)."""
        kind, size = graph
        if kind == "mixed":
            buf, seqs = self.mixed_buffers, self.mixed_seqs(size)
            logits, temps, seeds = self.mixed_logits[size], buf.temperatures, buf.seeds
            temps, seeds = temps[:seqs], seeds[:seqs]
        else:
            logits, temps, seeds = self.logits[size], self.temperatures[:size], self.seeds[:size]
        rows, words = logits.shape[0], bitmask.shape[1]
        masks = self.mask_buffer
        if masks is None or masks.shape[0] < rows or masks.shape[1] != words:
            top = max(rows, self.top, self.mixed_buffers.seqs if self.mixed_buffers else 0)
            masks = self.mask_buffer = torch.full(
                (top, words), -1, dtype=torch.int32, device=self.device
            )
            self.mask_graphs.clear()  # they read the old buffer
        masks[:batch].copy_(bitmask, non_blocking=True)
        entry = self.mask_graphs.get(graph)
        if entry is None:

            def run():
                return self.ops.sample(logits, temps, seeds, bitmask=masks[:rows])

            entry = self.mask_graphs[graph] = self._capture_sample(run)
        g, (tokens, logprobs) = entry
        g.replay()
        return tokens[:batch], logprobs[:batch]

    @torch.inference_mode()
    def _capture_sample(self, run):
        """(graph, outputs) of a sampling op `run` (no attention metadata), in the sampling
        graphs' own pool."""
        graph, outputs, self._mask_pool = _capture(run, self._mask_pool)
        return graph, outputs

    def replay(self, graph: tuple[str, int], batch: int):
        """Replay a graph ("decode", rows) or ("mixed", tokens) over the staged inputs: the
        first `batch` rows' logits [batch, vocab] (a mixed graph's rows are the sampling
        rows), where it samples their (tokens, logprobs), and where it keeps them their
        hidden states [batch, H] (else None)."""
        kind, size = graph
        if kind == "mixed":
            self.mixed[size].replay()
            logits, sampled = self.mixed_logits[size], self.mixed_sampled[size]
            hidden = self.mixed_hidden[size]
        else:
            self.graphs[size].replay()
            logits, sampled, hidden = self.logits[size], self.sampled[size], self.hidden[size]
        if sampled is not None:
            sampled = (sampled[0][:batch], sampled[1][:batch])
        return logits[:batch], sampled, None if hidden is None else hidden[:batch]
