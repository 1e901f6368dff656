"""How close the decode step's GEMMs (cuBLAS through F.linear) come to memory bandwidth (GPU).

Qwen3-0.6B's projections at the batch sizes decode runs at: microseconds (CUDA-graph replay
of 20 calls, so launch gaps count as they do in the engine's graphs) and weight GB/s.

    PYTHONPATH=src python3 benchmarks/bench_linear.py
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from shapes import QWEN3_0_6B


def graph_time(fn, reps: int = 20) -> float:
    """Seconds per call of fn, replayed from a CUDA graph of `reps` calls (median of 10)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / reps)
    return sorted(times)[len(times) // 2]


def main() -> None:
    c = QWEN3_0_6B
    h, d = c["hidden_size"], c["head_dim"]
    q, kv, inter = (
        c["num_attention_heads"] * d,
        c["num_key_value_heads"] * d,
        c["intermediate_size"],
    )
    shapes = {
        "qkv": (h, q + 2 * kv),
        "o": (q, h),
        "gate_up": (h, 2 * inter),
        "down": (inter, h),
        "lm_head": (h, c["vocab_size"]),
    }
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    print("| layer | K -> N | batch | us | weight GB/s |")
    print("|---|---|---|---|---|")
    for name, (k, n) in shapes.items():
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        for m in (1, 8, 64, 256):
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            t = graph_time(functools.partial(F.linear, x, w))
            print(f"| {name} | {k} -> {n} | {m} | {t * 1e6:.1f} | {w.numel() * 2 / t / 1e9:.0f} |")


if __name__ == "__main__":
    main()
