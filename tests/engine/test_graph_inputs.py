"""Decode steps staged into the CUDA graphs' flat input buffers (one copy per dtype, padded
rows, in-flight input ids gathered on the device) give the same tokens as eager steps.

CUDA graphs need a GPU; here each "graph" replays the eager forward over the staged buffers,
exactly the views the real graphs were captured on, so the staging itself is what is tested.
"""

import random

import numpy as np
import pytest
import torch

from kiln.engine import LLM, SamplingParams
from kiln.engine.attention import AttentionMetadata
from kiln.engine.cuda_graphs import TableRows, write_rows


def test_table_rows_rewrite_only_changed_rows_and_match_a_full_rewrite():
    """Block tables that gain blocks, have one replaced (copy-on-write) or dropped (trim,
    eviction), rows that another sequence takes over, a batch that shrinks and grows: the
    kept rows equal a fresh zeroed write of the step's tables, and only rows whose table
    differs from the last step's are rewritten."""
    rng = random.Random(0)
    rows = TableRows(np.zeros((12, 9), dtype=np.int32))
    tables = [[rng.randrange(100)] for _ in range(8)]
    last: list[list[int]] = []
    for step in range(300):
        for t in tables:
            r = rng.random()
            if r < 0.2 and len(t) < 9:
                t.append(rng.randrange(100))  # a block appended
            elif r < 0.25:
                t[rng.randrange(len(t))] = rng.randrange(100)  # copy-on-write
            elif r < 0.3 and len(t) > 1:
                t.pop(rng.randrange(len(t)))  # evicted or trimmed
        r = rng.random()
        if r < 0.1:  # a sequence finishes: the rows after it move up
            tables.pop(rng.randrange(len(tables)))
        elif r < 0.2 and len(tables) < 12:  # one arrives
            tables.append([rng.randrange(100) for _ in range(rng.randrange(1, 9))])
        elif r < 0.25:  # another sequence in a row
            tables[rng.randrange(len(tables))] = [rng.randrange(100)]
        rewritten = rows.write(tables)
        want = np.zeros_like(rows.array)
        write_rows(want, tables)
        np.testing.assert_array_equal(rows.array, want, err_msg=f"step {step}")
        padded = last + [[]] * (len(tables) - len(last))
        assert rewritten == [i for i, t in enumerate(tables) if t != padded[i]]
        last = [list(t) for t in tables]


class ReplayEager:
    """Stands in for a captured decode graph of `size` rows: reads only the graph buffers."""

    def __init__(self, graph_runner, size):
        self.graph_runner, self.size = graph_runner, size

    def replay(self):
        g, n = self.graph_runner, self.size
        md = AttentionMetadata(
            positions=g.positions[:n], slot_mapping=g.slots[:n],
            block_tables=g.block_tables[:n], context_lens=g.context_lens[:n],
            cu_seqlens_q=g.cu_seqlens[: n + 1], num_decodes=n, query_lens=[1] * n,
        )  # fmt: skip
        g.backend.set_metadata(md)
        with torch.inference_mode():
            _copy_outputs(g.body(n, md), (g.logits[n], g.sampled[n], g.hidden[n]))


def _copy_outputs(outputs, static):
    """A body's (logits, sampled, hidden) into the graph's static outputs, as a replay does."""
    logits, sampled, hidden = outputs
    static[0].copy_(logits)
    if sampled is not None:
        for s, value in zip(static[1], sampled):
            s.copy_(value)
    if hidden is not None:
        static[2].copy_(hidden)


def _static_hidden(g, rows: dict[int, int], hidden_size: int, dtype) -> dict:
    """The graphs' static hidden outputs (None unless the runner keeps the rows')."""
    return {n: torch.zeros(r, hidden_size, dtype=dtype) if g.keep_rows else None
            for n, r in rows.items()}  # fmt: skip


def _fake_graphs(llm, sample_in_graph, sizes=(1, 2, 4, 8)):
    r = llm.engine.runner
    g = r.graph_runner
    g.alloc_buffers(sizes[-1])
    vocab = r.model_config.vocab_size
    g.logits = {n: torch.zeros(n, vocab, dtype=r.dtype) for n in sizes}
    g.sampled = {n: (torch.zeros(n, dtype=torch.long), torch.zeros(n)) for n in sizes}
    g.hidden = _static_hidden(g, {n: n for n in sizes}, r.model_config.hidden_size, r.dtype)
    g.sample_in_graph = sample_in_graph
    g.graphs = {n: ReplayEager(g, n) for n in sizes}


@pytest.mark.parametrize("sample_in_graph", [False, True], ids=["sampler", "graph-samples"])
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["lockstep", "async"])
@pytest.mark.parametrize("table_limit", [65536, 4], ids=["full-rows", "own-columns"])
def test_staged_graph_inputs_give_the_same_tokens(
    hf_model_dir, random_prompts, monkeypatch, async_scheduling, table_limit, sample_in_graph
):
    path, _ = hf_model_dir("qwen3")
    prompts = random_prompts((33, 7, 50, 16, 21), seed=5)
    # Different lengths: the batch shrinks (pad rows, reordered in-flight ids) as they end;
    # the seeded request cannot be sampled in the graph (its rows fall back to the sampler).
    params = [
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (30, 3, 24, 9)
    ]
    params.append(SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True))
    runs = []
    for fake in (False, True):
        llm = LLM(str(path), device="cpu", async_scheduling=async_scheduling, max_num_seqs=8)
        if fake:
            monkeypatch.setattr(llm.engine.runner.graph_runner, "TABLE_COPY_LIMIT", table_limit)
            _fake_graphs(llm, sample_in_graph)
            replays = []

            def counted(replay, replays=replays):
                return lambda: (replays.append(1), replay())

            for g in llm.engine.runner.graph_runner.graphs.values():
                monkeypatch.setattr(g, "replay", counted(g.replay))
        out = llm.generate(prompt_token_ids=prompts, sampling_params=params)
        llm.engine.block_manager.check_all_free()
        runs.append([o.outputs[0].token_ids for o in out])
    assert len(replays) > 20  # the decode steps went through the staged buffers
    assert runs[1] == runs[0]
    if sample_in_graph:  # the greedy-only steps were sampled in-graph (lockstep too)
        assert any(t.any() for t, _ in llm.engine.runner.graph_runner.sampled.values())


class ReplayEagerMixed:
    """Stands in for a captured mixed graph of `size` tokens: reads only the mixed buffers."""

    def __init__(self, graph_runner, size):
        self.graph_runner, self.size = graph_runner, size
        # what the backend holds at capture: a real graph replays the tensors it saw then
        g = graph_runner
        g.backend.set_metadata(g.mixed_buffers.metadata(size, g.mixed_seqs(size)))
        self.captured = (g.backend.metadata, dict(g.backend._views))

    def replay(self):
        g, n = self.graph_runner, self.size
        g.backend.metadata, g.backend._views = self.captured[0], dict(self.captured[1])
        md = g.backend.metadata
        with torch.inference_mode():
            static = (g.mixed_logits[n], g.mixed_sampled[n], g.mixed_hidden[n])
            _copy_outputs(g.body_mixed(n, md), static)


def _fake_mixed_graphs(llm, sample_in_graph, sizes):
    r = llm.engine.runner
    g = r.graph_runner
    g.alloc_mixed_buffers(sizes[-1])
    vocab = r.model_config.vocab_size
    rows = {n: g.mixed_seqs(n) for n in sizes}
    g.mixed_logits = {n: torch.zeros(rows[n], vocab, dtype=r.dtype) for n in sizes}
    g.mixed_sampled = {n: (torch.zeros(rows[n], dtype=torch.long), torch.zeros(rows[n]))
                       for n in sizes}  # fmt: skip
    g.mixed_hidden = _static_hidden(g, rows, r.model_config.hidden_size, r.dtype)
    g.sample_in_graph = sample_in_graph
    g.mixed = {n: ReplayEagerMixed(g, n) for n in sizes}


@pytest.mark.parametrize(
    "sample_in_graph,async_scheduling,table_limit,backend",
    [
        *(
            (sample, asynch, limit, "torch")
            for sample in (False, True)
            for asynch in (False, True)
            for limit in (65536, 4)
        ),
        # the Triton kernels, in the interpreter on CPU
        pytest.param(False, True, 65536, "triton", marks=pytest.mark.slow),
    ],
)
def test_staged_mixed_steps_give_the_same_tokens(
    hf_model_dir,
    random_prompts,
    monkeypatch,
    async_scheduling,
    table_limit,
    sample_in_graph,
    backend,
):
    """Steps with prefill chunks (fresh prompts, chunks of long ones, prefix-cache hits, decodes
    beside them) staged into the mixed graphs' buffers: padded tokens and empty padded
    sequences change nothing, and only the sampling rows come out. With the Triton kernels the
    staged steps' decodes go through the decode kernel (kiln.kernels.mixed_attention) and give
    the eager reference's tokens."""
    path, _ = hf_model_dir("qwen3")
    prompts = random_prompts((33, 7, 50, 16, 21, 40), seed=9)
    prompts[5][:32] = prompts[0][:32]  # two full blocks of prefix hits for the last prompt
    params = [
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (12, 3, 10, 9, 6, 8)
    ]
    params[4] = SamplingParams(temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    engine_args = dict(device="cpu", async_scheduling=async_scheduling, max_num_seqs=4,
                       max_num_batched_tokens=24)  # fmt: skip
    runs = []
    for fake in (False, True):
        llm = LLM(str(path), **engine_args, attention_backend=backend if fake else "torch")
        if fake:
            monkeypatch.setattr(llm.engine.runner.graph_runner, "TABLE_COPY_LIMIT", table_limit)
            _fake_mixed_graphs(llm, sample_in_graph, sizes=(16, 32))
            replays = []

            def counted(replay, size, replays=replays):
                return lambda: (replays.append(size), replay())

            for size, g in llm.engine.runner.graph_runner.mixed.items():
                monkeypatch.setattr(g, "replay", counted(g.replay, size))
        out = llm.generate(prompt_token_ids=prompts, sampling_params=params)
        llm.engine.block_manager.check_all_free()
        runs.append([o.outputs[0].token_ids for o in out])
    # budget 24 > the 16-token graph: both sizes ran (decode-only steps too: no decode graphs)
    assert set(replays) == {16, 32} and len(replays) > 15
    assert runs[1] == runs[0]
    if sample_in_graph:
        assert any(t.any() for t, _ in llm.engine.runner.graph_runner.mixed_sampled.values())


class _FakeGraph:
    """torch.cuda.CUDAGraph's surface, on the CPU: capture() runs the body once (eagerly)."""

    def pool(self):
        return "pool"

    def replay(self):
        pass


def test_capture_builds_every_graph_over_the_shared_buffers(hf_model_dir, monkeypatch):
    """CudaGraphRunner.capture on the CPU with torch's graph API stubbed: every decode and
    mixed graph is built (largest first, one pool), their static outputs have the graph's
    rows, and the backend's views point into the staged buffers (no stale copies)."""
    import contextlib

    path, _ = hf_model_dir("qwen3")
    llm = LLM(str(path), device="cpu", max_num_seqs=8)
    g = llm.engine.runner.graph_runner
    pools = []

    @contextlib.contextmanager
    def fake_graph(graph, pool=None):
        pools.append(pool)
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    g.capture([1, 2, 4, 8], [16, 32])
    assert list(g.graphs) == [1, 2, 4, 8] and list(g.mixed) == [16, 32]
    assert pools[0] is None and set(pools[1:]) == {"pool"}  # the first graph's pool, shared
    vocab = llm.engine.runner.model_config.vocab_size
    assert g.logits[4].shape == (4, vocab) and g.sampled[4][0].shape == (4,)
    assert g.mixed_logits[16].shape == (8, vocab)  # min(16 tokens, max_num_seqs 8) rows
    g.backend.set_metadata(g.mixed_buffers.metadata(32, 8))
    cu = g.backend._views["prefill_cu_seqlens_q"]
    assert cu.data_ptr() == g.mixed_buffers.cu_seqlens.data_ptr()  # a view, not a copy
