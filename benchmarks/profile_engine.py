"""Where an engine step's time goes (GPU): scheduling, packing, the forward, sampling, the rest.

    PYTHONPATH=src python3 benchmarks/profile_engine.py [--requests 256] [--out DIR]

Wraps the engine's phases with synchronizing timers (so the forward's time includes its GPU
work), runs the nano-vllm workload, and prints milliseconds per step for each phase; then a
torch.profiler table of the top CUDA kernels over a few decode steps.
"""

from __future__ import annotations

import argparse
import collections
import functools
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import QWEN3_06B, build_model  # noqa: E402

from kiln.engine import LLM, SamplingParams  # noqa: E402
from kiln.eval.workload import offline_workload, run_offline  # noqa: E402

TIMES: dict[str, float] = collections.defaultdict(float)
COUNTS: dict[str, int] = collections.defaultdict(int)


def timed(name, fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*a, **k)
        torch.cuda.synchronize()
        TIMES[name] += time.perf_counter() - t0
        COUNTS[name] += 1
        return out

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    del_model = build_model(tmp)
    del del_model
    torch.cuda.empty_cache()
    # Lockstep steps, so that each phase's timer sees its own GPU work.
    llm = LLM(str(tmp), max_model_len=4096, attention_backend="triton", async_scheduling=False)
    eng = llm.engine
    runner = eng.runner
    run_offline(llm, offline_workload(4, (32, 64), (8, 8), QWEN3_06B["vocab_size"], seed=1))
    eng.step = timed("step (total)", eng.step)
    eng.scheduler.schedule = timed("schedule", eng.scheduler.schedule)
    runner.prepare = timed("prepare (pack + H2D)", runner.prepare)
    for graph in runner.graph_runner.graphs.values():
        graph.replay = timed("graph replay", graph.replay)
    runner.execute = timed("execute (incl. prepare, forward, sampling)", runner.execute)
    eng.sampler.sample = timed("sample (steps not sampled in a graph)", eng.sampler.sample)
    work = offline_workload(args.requests, (100, 1024), (100, 1024), QWEN3_06B["vocab_size"])
    res = run_offline(llm, work)
    lines = [
        f"device {torch.cuda.get_device_name()}; {res}",
        "",
        "| phase | calls | ms/call | total s |",
        "|---|---|---|---|",
    ]
    for name, t in sorted(TIMES.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {COUNTS[name]} | {1e3 * t / COUNTS[name]:.3f} | {t:.2f} |")
    print("\n".join(lines), flush=True)
    # batch-1 decode breakdown
    TIMES.clear()
    COUNTS.clear()
    p = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
    llm.generate(prompt_token_ids=[list(range(11, 139))], sampling_params=p)
    lines = ["", "batch-1 decode:", "| phase | calls | ms/call |", "|---|---|---|"]
    for name, t in sorted(TIMES.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {COUNTS[name]} | {1e3 * t / COUNTS[name]:.3f} |")
    print("\n".join(lines), flush=True)
    # kernel table for a few batch-1 decode steps
    from torch.profiler import ProfilerActivity, profile

    tables = []
    for batch in (64, 1):
        p = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            llm.generate(prompt_token_ids=[list(range(11, 139))] * batch, sampling_params=p)
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
        tables.append(f"kernels, batch {batch}, 16 decode steps:\n{table}")
        print(tables[-1])
    if args.out:
        Path(args.out, "profile.txt").write_text("\n".join(lines) + "\n" + "\n".join(tables))


if __name__ == "__main__":
    main()
