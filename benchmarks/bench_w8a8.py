"""W8A8 Linears against cuBLAS bf16 (GPU): FP8 and int8 W8A8Linear, activation quantization
included, on Llama-3-8B's projections.

    PYTHONPATH=src:benchmarks python benchmarks/bench_w8a8.py [--m 1 4 16 64 256 1024 4096]
        [--backends] [--sweep]

Microseconds per call (CUDA-graph replay, median of 10), the speedup over F.linear in bf16,
the path W8A8Linear takes at that M (kiln.model.w8a8.pick_backend) and its kernel launches
per call (torch.profiler's CUDA events: kernels, memsets, copies). --backends adds a table of
every path forced at every M: "fused" (one Triton GEMV quantizes x and multiplies, M <= 16),
"triton" (quantization kernel + kiln's tensor-core GEMM), "scaled_mm" (+ torch._scaled_mm,
FP8), "int_mm" (+ torch._int_mm + one epilogue kernel, int8); it settles FUSED_MAX_M,
SCALED_MM_MIN_M and INT8_GEMM. --sweep times the fused GEMV (M <= 16) and kiln's GEMM alone
on quantized x over their sweep configs (kiln.kernels.w8a8_mm) and prints the best launch
settings against the defaults. Every call of a replay reads the same weight: the 8-bit qkv
and o weights (25 and 16 MB) and their bf16 ones (50 and 32 MB) can sit in an H100's 50 MB L2,
so the small-M rows of those layers overstate the bandwidth of both sides. Without CUDA it
times the float32 references on a tiny shape, to show the script runs.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
import torch.nn.functional as F
from bench_linear import graph_time

from kiln.kernels.quant_act import quantize_rows_triton
from kiln.kernels.w8a8_mm import (
    GEMV_MAX_M,
    gemv_config,
    gemv_sweep_configs,
    pick_config,
    sweep_configs,
    w8a8_gemv_triton,
    w8a8_mm_triton,
)
from kiln.model.w8a8 import FP8, W8A8Linear, pick_backend, quantize_weight, w8a8_linear

# Llama-3-8B: hidden 4096, 32 heads / 8 KV heads of 128, intermediate 14336; (in, out).
LLAMA3_8B = {
    "qkv": (4096, 6144),
    "o": (4096, 4096),
    "gate_up": (4096, 28672),
    "down": (14336, 4096),
}
TINY = {"qkv": (64, 128), "down": (128, 64)}
NAMES = {FP8: "fp8", torch.int8: "int8"}
PATHS = {FP8: ("fused", "triton", "scaled_mm"), torch.int8: ("fused", "triton", "int_mm")}


def wall_time(fn, reps: int = 5) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def launches(fn) -> int:
    """CUDA work items (kernels, memsets, copies) one call of fn issues."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def best_config(run, default: dict, configs: list[dict], keys: tuple[str, ...]) -> str:
    """'best us (its settings) vs the default's us' for run(config=...)."""
    base = graph_time(functools.partial(run, config=default))
    times = []
    for cfg in configs:
        try:
            times.append((graph_time(functools.partial(run, config=cfg)), cfg))
        except Exception as e:  # a config the compiler refuses (shared memory, registers)
            print(f"  skip {cfg}: {type(e).__name__}")
    t, cfg = min(times, key=lambda tc: tc[0])
    return f"{t * 1e6:.1f} ({', '.join(str(cfg[k]) for k in keys)}) vs {base * 1e6:.1f}"


def sweep(layer: W8A8Linear, x: torch.Tensor) -> list[str]:
    """The fused GEMV's (M <= GEMV_MAX_M) and kiln's GEMM's best launch settings here."""
    m, n = x.shape[0], layer.out_features
    w, ws = layer.weight, layer.weight_scale
    out = []
    if m <= GEMV_MAX_M:
        run = functools.partial(w8a8_gemv_triton, x, w, ws)
        keys = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
        out.append("gemv " + best_config(run, gemv_config(m, n), gemv_sweep_configs(m), keys))
    xq, xs = quantize_rows_triton(x, w.dtype)
    run = functools.partial(w8a8_mm_triton, xq, xs, w, ws, x.dtype)
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
    out.append("gemm " + best_config(run, pick_config(m, n), sweep_configs(m), keys))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, nargs="*", default=[1, 4, 16, 64, 256, 1024, 4096])
    p.add_argument("--backends", action="store_true", help="time every path at every M")
    p.add_argument("--sweep", action="store_true", help="sweep the Triton kernels' launch settings")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    timer = graph_time if cuda else wall_time
    shapes = LLAMA3_8B if cuda else TINY
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu (float32 references)'}")
    print(f"torch {torch.__version__}")
    base_name = "bf16" if cuda else "fp32"
    print(
        f"| layer | M | {base_name} us | fp8 us | fp8 x | fp8 path (launches) "
        "| int8 us | int8 x | int8 path (launches) |"
    )
    print("|---|---:|---:|---:|---:|---|---:|---:|---|")
    extra, sweeps = [], []
    for name, (k, n) in shapes.items():
        w = (0.02 * torch.randn(n, k, device=device)).to(dtype)
        layers = {}
        for qdtype in (FP8, torch.int8):
            q = quantize_weight(w, qdtype)
            layers[qdtype] = W8A8Linear(q.weight, q.weight_scale)
        for m in args.m:
            x = torch.randn(m, k, device=device, dtype=dtype)
            base = timer(functools.partial(F.linear, x, w))
            row = f"| {name} {k}x{n} | {m} | {base * 1e6:.1f} |"
            for qdtype, layer in layers.items():
                t = timer(functools.partial(layer, x))
                path = pick_backend(qdtype, m) if cuda else "reference"
                count = launches(functools.partial(layer, x)) if cuda else "-"
                row += f" {t * 1e6:.1f} | {base / t:.2f} | {path} ({count}) |"
                if cuda and args.backends:
                    for path in PATHS[qdtype]:
                        if path == "fused" and m > GEMV_MAX_M:
                            continue
                        run = functools.partial(
                            w8a8_linear, x, layer.weight, layer.weight_scale, None, None, path
                        )
                        t = timer(run)
                        extra.append(
                            f"| {name} | {m} | {NAMES[qdtype]} | {path} | {t * 1e6:.1f} | "
                            f"{base / t:.2f} | {launches(run)} |"
                        )
                if cuda and args.sweep:
                    for best in sweep(layer, x):
                        sweeps.append(f"| {name} | {m} | {NAMES[qdtype]} | {best} |")
            print(row, flush=True)
    if extra:
        print("\nevery path, forced (x: speedup over bf16):")
        print("| layer | M | dtype | path | us | x | launches |")
        print("|---|---:|---|---|---:|---:|---:|")
        print("\n".join(extra))
    if sweeps:
        print("\nbest launch settings (gemv: BLOCK_N, K, warps, stages; gemm: BLOCK_M, N, K,")
        print("warps, stages) vs the defaults (gemv: x quantized inside; gemm: the GEMM alone):")
        print("| layer | M | dtype | kernel: best us (config) vs default us |")
        print("|---|---:|---|---|")
        print("\n".join(sweeps))


if __name__ == "__main__":
    main()
