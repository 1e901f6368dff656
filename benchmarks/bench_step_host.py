"""Host time per engine step at large batch, by part: what the step loop costs in Python for
each sequence it carries (issue 13: the served engine is bound by it at 256 sequences).

It drives kiln.LLM's engine as LLM.generate does (`engine.step(stream=False)`, FINAL_ONLY
requests, a BPE tokenizer detokenizing every token) over a tiny random Qwen3 (hidden 64, 2
layers, vocab 2048), 256-token random prompts, greedy, ignore_eos, async scheduling on. Four
cases: N in (64, 256) sequences, each as decode-only steps (N decodes) and as mixed steps (a
256-token prefill of a newly arrived request beside N - 16 .. N - 1 decodes).

The device work is replaced so the host's share can be read on a CPU (--path):
- graph (default): the step runs the CUDA-graph path a GPU runs (inputs staged into the
  graphs' buffers, the graph samples); the "graphs" are stand-ins on the CPU whose replay does
  nothing and whose sampled tokens are fixed;
- eager: the eager path (one staged buffer, then the sampler's fast path on fixed logits; the
  sampling is real torch compute on the CPU, device work on a GPU);
- real: no stand-ins (on a GPU host: real graphs; parts that wait for the GPU show it).

Parts (us a step, and us per sequence a step): schedule (Scheduler.schedule), prepare
(ModelRunner.prepare: flatten + staging; `flatten` is its share building the host lists),
forward (the model or its stand-in), sample (the sampler, eager only), update
(Scheduler.update), result (PendingSample.result: the sampled tokens to the host), process
(EngineCore._process: append, stop checks, deltas), output (the OutputProcessor:
detokenization, RequestOutputs), other (the rest of engine.step); core: the step less output
(what the engine-core process pays when serving: there the output processor runs in the API
process). Each part's median over the timed steps; with --repeat, the least of the repeats'
medians (a shared machine).

    PYTHONPATH=src:benchmarks python benchmarks/bench_step_host.py [--path eager] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_structured import TINY, build

from kiln.engine.cuda_graphs import graph_batch_sizes, mixed_token_sizes
from kiln.engine.llm import LLM
from kiln.engine.sampler import PendingSample
from kiln.engine.sampling_params import RequestOutputKind, SamplingParams

PARTS = ("schedule", "prepare", "flatten", "forward", "sample", "update", "result", "process",
         "output", "other")  # fmt: skip
PROMPT, OUTPUT, ARRIVALS = 256, 128, 16


class Timer:
    """Seconds per part of the current step, from wrapped methods."""

    def __init__(self):
        self.step: dict[str, float] = {}

    def wrap(self, obj, name: str, part: str) -> None:
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.step[part] = self.step.get(part, 0.0) + time.perf_counter() - t0

        setattr(obj, name, timed)


class NoGraph:
    """A captured graph's stand-in: its outputs are fixed buffers."""

    def replay(self) -> None:
        pass


def fixed_outputs(rows: int, vocab: int):
    """(logits, (tokens, logprobs), hidden) of a stand-in graph of `rows` rows."""
    tokens = torch.arange(2, rows + 2) % vocab
    return torch.zeros(rows, vocab), (tokens, torch.zeros(rows)), None


def stand_in_graphs(runner, max_seqs: int, max_tokens: int) -> None:
    """Give the runner graphs that do nothing, over its graph buffers on the CPU."""
    g, vocab = runner.graph_runner, runner.model_config.vocab_size
    g.alloc_buffers(max_seqs)
    for size in graph_batch_sizes(max_seqs):
        g.graphs[size] = NoGraph()
        g.logits[size], g.sampled[size], g.hidden[size] = fixed_outputs(size, vocab)
    sizes = mixed_token_sizes(max_tokens)
    g.alloc_mixed_buffers(sizes[-1])
    for size in sizes:
        g.mixed[size] = NoGraph()
        out = fixed_outputs(g.mixed_seqs(size), vocab)
        g.mixed_logits[size], g.mixed_sampled[size], g.mixed_hidden[size] = out


def stand_in_forward(runner, max_seqs: int) -> None:
    """The eager forward's stand-in: fixed logits for the sampling rows."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(max_seqs, runner.model_config.vocab_size, generator=gen)
    runner._forward = lambda plan: (logits[: len(plan.seqs)], None, [])


def instrument(llm: LLM) -> Timer:
    timer, eng = Timer(), llm.engine
    core = eng.core
    timer.wrap(core.scheduler, "schedule", "schedule")
    timer.wrap(core.scheduler, "update", "update")
    timer.wrap(core.runner, "prepare", "prepare")
    timer.wrap(core.runner, "_flatten", "flatten")
    timer.wrap(core.runner, "_forward", "forward")
    timer.wrap(core.sampler, "sample", "sample")
    timer.wrap(core, "_process", "process")
    timer.wrap(eng.processor, "process", "output")
    result = PendingSample.result

    def timed_result(self):
        t0 = time.perf_counter()
        out = result(self)
        timer.step["result"] = timer.step.get("result", 0.0) + time.perf_counter() - t0
        return out

    PendingSample.result = timed_result
    return timer


class Case:
    """Requests for one case; each new one has fresh random prompt tokens."""

    def __init__(self, llm: LLM, seed: int):
        self.llm, self.rng = llm, np.random.default_rng(seed)
        self.vocab = llm.engine.model_config.vocab_size
        self.rids: list[str] = []

    def add(self, n: int) -> None:
        p = SamplingParams(max_tokens=OUTPUT, temperature=0.0, ignore_eos=True,
                           output_kind=RequestOutputKind.FINAL_ONLY)  # fmt: skip
        for _ in range(n):
            rid = f"{id(self)}-{len(self.rids)}"
            ids = self.rng.integers(2, self.vocab, PROMPT).tolist()
            self.llm.engine.add_request(rid, None, p, ids)
            self.rids.append(rid)

    def settle(self) -> None:
        """Step until every request has its prompt computed and its first token read."""
        sched = self.llm.engine.scheduler
        for _ in range(64):
            self.llm.engine.step(stream=False)
            if not sched.waiting and all(s.num_output_tokens for s in sched.running):
                return
        raise RuntimeError("the requests did not settle")

    def end(self) -> None:
        eng = self.llm.engine
        for rid in self.rids:
            eng.abort(rid)
        while eng.core.has_work():
            eng.step(stream=False)


def run_case(llm: LLM, timer: Timer, n: int, mixed: bool, steps: int, seed: int):
    """Per timed step: ({part: seconds}, sequences in the step)."""
    case = Case(llm, seed)
    case.add(n - ARRIVALS if mixed else n)
    case.settle()
    rows = []
    for _ in range(ARRIVALS if mixed else steps):
        if mixed:
            case.add(1)
        timer.step = {}
        t0 = time.perf_counter()
        llm.engine.step(stream=False)
        total = time.perf_counter() - t0
        part = timer.step
        inner = part.get("flatten", 0.0)  # (counted inside prepare)
        part["other"] = total - sum(part.values()) + inner
        part["core"] = total - part.get("output", 0.0)
        part["total"] = total
        rows.append((part, len(llm.engine.scheduler.running)))
    case.end()
    return rows


def summarize(rows) -> dict[str, tuple[float, float]]:
    """{part: (median us a step, median us per sequence a step)}."""
    out = {}
    for part in (*PARTS, "core", "total"):
        per_step = [r.get(part, 0.0) * 1e6 for r, _ in rows]
        per_seq = [r.get(part, 0.0) * 1e6 / max(n, 1) for r, n in rows]
        out[part] = (statistics.median(per_step), statistics.median(per_seq))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--path", choices=("graph", "eager", "real"), default="graph")
    ap.add_argument("--seqs", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps a case")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="cProfile the last case's steps")
    args = ap.parse_args()
    torch.set_num_threads(1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = {**TINY, "max_position_embeddings": 1024}
    max_seqs = max(args.seqs)
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), shape, device)
        llm = LLM(tmp, device=device, max_num_seqs=max_seqs, async_scheduling=True,
                  max_num_batched_tokens=2048)  # fmt: skip
        runner = llm.engine.runner
        if args.path == "graph":
            stand_in_graphs(runner, max_seqs, 2048)
        elif args.path == "eager":
            stand_in_forward(runner, max_seqs)
        timer = instrument(llm)
        cases = [(n, mixed) for n in args.seqs for mixed in (False, True)]
        best: dict[tuple, dict] = {}
        for r in range(args.repeat):
            for n, mixed in cases:
                s = summarize(run_case(llm, timer, n, mixed, args.steps, seed=r))
                old = best.setdefault((n, mixed), s)
                best[(n, mixed)] = {p: min(old[p], s[p]) for p in s}
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            run_case(llm, timer, *cases[-1], args.steps, seed=99)
            prof.disable()
    print(f"path {args.path}, {device}; us a step / us per sequence a step (least of "
          f"{args.repeat} medians)")  # fmt: skip
    head = "".join(f"{p:>16}" for p in (*PARTS, "core", "total"))
    print(f"{'case':<12}{head}")
    for (n, mixed), s in best.items():
        name = f"{'mixed' if mixed else 'decode'} {n}"
        print(f"{name:<12}" + "".join(f"{s[p][0]:>9.0f} /{s[p][1]:>5.1f}" for p in s))
    if args.profile:
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
