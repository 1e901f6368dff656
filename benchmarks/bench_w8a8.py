"""W8A8 Linears against cuBLAS bf16 (GPU): FP8 (Triton per-token quantization + _scaled_mm
rowwise) and int8 (+ _int_mm), activation quantization included, on Llama-3-8B's projections.

    PYTHONPATH=src python benchmarks/bench_w8a8.py [--m 1 16 64 256 1024 4096]

Microseconds per call (CUDA-graph replay, median of 10) and the speedup over F.linear in bf16.
Without CUDA it times the float32 references on a tiny shape, to show the script runs.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
import torch.nn.functional as F
from bench_linear import graph_time

from kiln.model.w8a8 import FP8, W8A8Linear, quantize_weight

# Llama-3-8B: hidden 4096, 32 heads / 8 KV heads of 128, intermediate 14336; (in, out).
LLAMA3_8B = {
    "qkv": (4096, 6144),
    "o": (4096, 4096),
    "gate_up": (4096, 28672),
    "down": (14336, 4096),
}
TINY = {"qkv": (64, 128), "down": (128, 64)}


def wall_time(fn, reps: int = 5) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, nargs="*", default=[1, 16, 64, 256, 1024, 4096])
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    timer = graph_time if cuda else wall_time
    shapes = LLAMA3_8B if cuda else TINY
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu (float32 references)'}")
    base_name = "bf16" if cuda else "fp32"
    print(f"| layer | M | {base_name} us | fp8 us | fp8 x | int8 us | int8 x |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (k, n) in shapes.items():
        w = (0.02 * torch.randn(n, k, device=device)).to(dtype)
        layers = {}
        for qdtype in (FP8, torch.int8):
            q = quantize_weight(w, qdtype)
            layers[qdtype] = W8A8Linear(q.weight, q.weight_scale)
        for m in args.m:
            x = torch.randn(m, k, device=device, dtype=dtype)
            base = timer(functools.partial(F.linear, x, w))
            fp8 = timer(functools.partial(layers[FP8], x))
            int8 = timer(functools.partial(layers[torch.int8], x))
            print(
                f"| {name} {k}x{n} | {m} | {base * 1e6:.1f} | {fp8 * 1e6:.1f} | "
                f"{base / fp8:.2f} | {int8 * 1e6:.1f} | {base / int8:.2f} |"
            )


if __name__ == "__main__":
    main()
