"""Where a batch-1 decode step's time goes: host vs GPU, and the GPU kernel by kernel.

    PYTHONPATH=src python3 benchmarks/profile_decode.py [--out DIR] [--tokens 512]

Prints (1) end-to-end batch-1 decode tokens/s with the engine's defaults (CUDA graphs, async
scheduling); (2) the host's busy time per step (step wall time minus the time spent waiting for
the GPU's sampled tokens) against the GPU's time per step (the decode graph replayed alone,
back to back); (3) a torch.profiler table of the kernels of 32 batch-1 decode steps.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import build_model, decode_rate  # noqa: E402

from kiln.engine import LLM, SamplingParams  # noqa: E402
from kiln.engine import sampler as sampler_mod  # noqa: E402


def graph_ms(runner, size: int = 1, iters: int = 200) -> float:
    """GPU milliseconds of one decode-graph replay (back to back, inputs as last left)."""
    graph = runner.graph_runner.graphs[size]
    for _ in range(10):
        graph.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        graph.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / iters


def host_split(llm, tokens: int) -> tuple[float, float]:
    """(ms per step, ms per step spent waiting for the GPU) over a batch-1 decode."""
    waits = []
    result = sampler_mod.PendingSample.result

    def timed_result(self):
        t0 = time.perf_counter()
        out = result(self)
        waits.append(time.perf_counter() - t0)
        return out

    sampler_mod.PendingSample.result = timed_result
    try:
        params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(prompt_token_ids=[list(range(11, 139))], sampling_params=params)
        wall = time.perf_counter() - t0
    finally:
        sampler_mod.PendingSample.result = result
    steps = len(waits)
    return 1e3 * wall / steps, 1e3 * sum(waits[4:]) / max(steps - 4, 1)


def variant_table(llm) -> None:
    """Batch-1 decode graph time with parts of the fast path switched off, one process (the
    graphs re-captured for each; inputs: a 128-token prompt 256 tokens into its decode)."""
    import dataclasses
    import functools

    from kiln.kernels import _triton
    from kiln.kernels.decode_qkv import paged_decode_qkv_triton

    runner = llm.engine.runner
    backend, graphs = runner.backend, runner.graph_runner
    ops, sizes = backend.ops, list(graphs.graphs)
    fused = ops.paged_decode_qkv
    blocks = runner.model.layers
    variants = {
        "default (resident GEMVs, fused decode, sampling in the graph, PDL)": {},
        "sampling outside the graph": {"sample_in_graph": False},
        "cuBLAS LM head": {"lm_head": 0},
        "fused decode, 8 splits": {"decode_qkv": functools.partial(fused, num_splits=8)},
        "fused decode, split merge in the kernel": {
            "decode_qkv": functools.partial(fused, last_reduces=True)
        },
        "unfused decode (qkv_prepare, decode, reduce)": {"decode_qkv": None},
        "no PDL anywhere": {"pdl": False},
        "cuBLAS projections": {"gemv": 0},
    }
    assert fused is paged_decode_qkv_triton
    p = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
    print("| variant | decode graph ms (batch 1) | tok/s end to end |")
    print("|---|---|---|")
    for name, v in variants.items():
        backend.ops = dataclasses.replace(ops, paged_decode_qkv=v.get("decode_qkv", fused))
        graphs.sample_in_graph = v.get("sample_in_graph", True)
        runner.model.lm_head.gemv_max_batch = v.get("lm_head", 1)
        _triton.PDL_ENABLED = v.get("pdl", True)
        for b in blocks:
            b.gemv_max_batch = v.get("gemv", 1)
        graphs.graphs = {}
        graphs.capture(sizes)
        rate = decode_rate(llm, new_tokens=256)
        llm.generate(prompt_token_ids=[list(range(11, 139))], sampling_params=p)
        print(f"| {name} | {graph_ms(runner):.3f} | {rate:.0f} |", flush=True)
    backend.ops, _triton.PDL_ENABLED = ops, True
    graphs.sample_in_graph = True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--gemv-max-batch", type=int, default=1)
    ap.add_argument("--variants", action="store_true", help="graph time of kernel variants")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    del_model = build_model(tmp)
    del del_model
    torch.cuda.empty_cache()
    llm = LLM(
        str(tmp), max_model_len=4096, attention_backend="triton",
        gemv_max_batch=args.gemv_max_batch,
    )  # fmt: skip
    runner = llm.engine.runner
    if args.variants:
        variant_table(llm)
        return
    rate = decode_rate(llm, new_tokens=args.tokens)
    step_ms, wait_ms = host_split(llm, args.tokens)
    g_ms = graph_ms(runner)
    lines = [
        f"device {torch.cuda.get_device_name()}, torch {torch.__version__}",
        f"batch-1 decode: {rate:.0f} tok/s ({1e3 / rate:.3f} ms/token)",
        f"step wall {step_ms:.3f} ms = host busy {step_ms - wait_ms:.3f} + waiting {wait_ms:.3f}",
        f"decode graph (batch 1) replayed alone: {g_ms:.3f} ms",
    ]
    print("\n".join(lines), flush=True)
    import cProfile
    import io
    import pstats

    prof_host = cProfile.Profile()
    p = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
    prof_host.enable()
    llm.generate(prompt_token_ids=[list(range(11, 139))], sampling_params=p)
    prof_host.disable()
    buf = io.StringIO()
    pstats.Stats(prof_host, stream=buf).sort_stats("tottime").print_stats(25)
    host = buf.getvalue().splitlines()
    host = ["host profile, 256 batch-1 decode steps (cProfile, by own time):"] + host[:60]
    print("\n".join(host), flush=True)
    lines += [""] + host
    from torch.profiler import ProfilerActivity, profile

    steps = 32
    p = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate(prompt_token_ids=[list(range(11, 139))], sampling_params=p)
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total_us = sum(e.self_device_time_total for e in events)
    rows = [
        f"kernels over {steps} batch-1 decode steps (plus the prompt's prefill): "
        f"{total_us / steps / 1e3:.3f} ms of kernel time per step",
        "| kernel | calls/step | us/call | us/step |",
        "|---|---|---|---|",
    ]
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:40]:
        name = e.key if len(e.key) < 70 else e.key[:67] + "..."
        rows.append(
            f"| {name} | {e.count / steps:.1f} | {e.self_device_time_total / e.count:.2f} | "
            f"{e.self_device_time_total / steps:.1f} |"
        )
    print("\n".join(rows), flush=True)
    if args.out:
        Path(args.out, "profile_decode.txt").write_text("\n".join(lines + [""] + rows) + "\n")


if __name__ == "__main__":
    main()
