"""Decode steps staged into the CUDA graphs' flat input buffers (one copy per dtype, padded
rows, in-flight input ids gathered on the device) give the same tokens as eager steps.

CUDA graphs need a GPU; here each "graph" replays the eager forward over the staged buffers,
exactly the views the real graphs were captured on, so the staging itself is what is tested.
"""

import pytest
import torch

from kiln.engine import LLM, SamplingParams
from kiln.engine.attention import AttentionMetadata


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
            logits, sampled = g.body(n, md)
            g.logits[n].copy_(logits)
            if sampled is not None:
                for static, value in zip(g.sampled[n], sampled):
                    static.copy_(value)


def _fake_graphs(llm, sample_in_graph, sizes=(1, 2, 4, 8)):
    r = llm.engine.runner
    g = r.graph_runner
    g.alloc_buffers(sizes[-1])
    vocab = r.model_config.vocab_size
    g.logits = {n: torch.zeros(n, vocab, dtype=r.dtype) for n in sizes}
    g.sampled = {n: (torch.zeros(n, dtype=torch.long), torch.zeros(n)) for n in sizes}
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
