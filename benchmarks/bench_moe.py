"""The fused MoE kernel (kiln.kernels.fused_moe) against the per-expert loop, one MoE layer.

    python benchmarks/bench_moe.py                 # GPU: Mixtral-8x7B and Qwen3-30B-A3B layers
    python benchmarks/bench_moe.py --shapes tiny   # CPU: Triton's interpreter, tiny sizes

For 1, 32 and 512 tokens (random router logits, top-k as the model routes them) each row times
the per-expert loop the model runs (fused_moe_ref: a gather, two Linears and an index_add per
chosen expert) and the two grouped GEMMs (fused_moe_triton, launch settings from the shape's
tuned JSON, else default.json), and gives the kernel's weight bandwidth (bytes of the experts
it reads / time) and its largest error relative to the reference. GPU times: median of
triton.testing.do_bench; CPU times (the interpreter): not a speed measure, only a check that
the script runs.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_shapes import MOE_SHAPES  # noqa: E402

from kiln.kernels.fused_moe import fused_moe_ref, fused_moe_triton  # noqa: E402
from kiln.model.layers import route  # noqa: E402


def timer(device: str):
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=10, rep=50, return_mode="median")

    def cpu_ms(fn, reps=3):
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 1e3 * sorted(times)[reps // 2]

    return cpu_ms


def layer(shape: dict, dtype, device):
    e, h, i = shape["experts"], shape["hidden"], shape["inter"]
    g = torch.Generator(device=device).manual_seed(0)
    w13 = torch.randn(e, 2 * i, h, generator=g, device=device, dtype=dtype) / h**0.5
    w2 = torch.randn(e, h, i, generator=g, device=device, dtype=dtype) / i**0.5
    return w13, w2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["mixtral-8x7b", "qwen3-30b-a3b"],
                    choices=sorted(MOE_SHAPES))  # fmt: skip
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 32, 512])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    ms = timer(device)
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (interpreter)'}")
    print(f"{'model':<15}{'tokens':>7}{'experts hit':>12}{'loop ms':>10}{'fused ms':>10}"
          f"{'speedup':>9}{'fused GB/s':>11}{'rel err':>10}")  # fmt: skip
    for name in args.shapes:
        shape = MOE_SHAPES[name]
        w13, w2 = layer(shape, dtype, device)
        bytes_per_expert = (w13[0].numel() + w2[0].numel()) * w13.element_size()
        for n in args.tokens:
            x = torch.randn(n, shape["hidden"], device=device, dtype=dtype)
            logits = torch.randn(n, shape["experts"], device=device)
            weights, ids = route(logits, shape["top_k"], renormalize=True)
            ref = fused_moe_ref(x, w13, w2, weights, ids)
            out = fused_moe_triton(x, w13, w2, weights, ids)
            err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            t_ref = ms(functools.partial(fused_moe_ref, x, w13, w2, weights, ids))
            t_fused = ms(functools.partial(fused_moe_triton, x, w13, w2, weights, ids))
            hit = ids.unique().numel()
            gbps = hit * bytes_per_expert / t_fused / 1e6
            print(f"{name:<15}{n:>7}{hit:>12}{t_ref:>10.3f}{t_fused:>10.3f}"
                  f"{t_ref / t_fused:>8.2f}x{gbps:>11.0f}{err:>10.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
