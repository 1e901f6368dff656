"""2:4 semi-structured sparsity on the GPU (issue 25): PyTorch's sparse kernels (cuSPARSELt and
CUTLASS, torch.sparse.to_sparse_semi_structured) against dense cuBLAS (F.linear) for the MLP
GEMMs of Qwen3-0.6B and Llama-3-8B, at batch 1 (decode) and 256 (prefill / large batches).

    PYTHONPATH=src:benchmarks python benchmarks/bench_sparse24.py [--batches 1 256 2048]

Weights are pruned 2:4 by magnitude with kiln prune's own mask (kiln.compress.prune.prune_mask),
so they are laid out as `kiln prune --pattern 2:4` writes them; each sparse product is checked
against the dense product of the same pruned weight. Times are medians of CUDA-graph replays
(bench_linear.graph_time; a plain timed loop where a backend refuses capture). Without CUDA it
prints why and exits 0.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from shapes import QWEN3_0_6B

from kiln.compress.prune import prune_mask

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336)


def mlp_shapes() -> dict[str, tuple[int, int]]:
    """name -> (in_features, out_features) of the MLP GEMMs (gate and up fused, as the engine
    runs them)."""
    out = {}
    for model, c in (("qwen3-0.6b", QWEN3_0_6B), ("llama3-8b", LLAMA3_8B)):
        h, i = c["hidden_size"], c["intermediate_size"]
        out[f"{model} gate_up"] = (h, 2 * i)
        out[f"{model} down"] = (i, h)
    return out


def timed(fn, reps: int = 20) -> float:
    """Seconds per call: CUDA-graph replay where fn captures, else a synchronized loop."""
    from bench_linear import graph_time

    try:
        return graph_time(fn, reps)
    except Exception:  # a backend that cannot be captured: time it eagerly
        torch.cuda.synchronize()
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps * 10):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / (reps * 10)


def sparse_weight(w: torch.Tensor, backend: str):
    """w (2:4 already) as a semi-structured sparse tensor of `backend`, or None if refused."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    try:
        return to_sparse_semi_structured(w)
    except Exception as e:  # cuSPARSELt missing, a shape refused, ...
        print(f"  {backend}: refused ({str(e).splitlines()[0][:80]})")
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_sparse24: needs a CUDA GPU (semi-structured sparse kernels); skipped")
        return
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}")
    print("| GEMM (in -> out) | batch | dense us | cuSPARSELt us | CUTLASS us | best speedup |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (k, n) in mlp_shapes().items():
        w = torch.randn(n, k, device="cuda", dtype=dtype) * 0.02
        w = w.masked_fill(prune_mask(w.abs(), 0.5, (2, 4), per_row=True), 0)
        sparse = {b: sparse_weight(w, b) for b in ("cusparselt", "cutlass")}
        for m in args.batches:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = F.linear(x, w)
            dense_t = timed(lambda x=x, w=w: F.linear(x, w))
            times = {}
            for backend, ws in sparse.items():
                if ws is None:
                    continue
                try:
                    y = F.linear(x, ws)
                except Exception as e:
                    print(f"  {backend} at batch {m}: {str(e).splitlines()[0][:80]}")
                    continue
                err = (y.float() - ref.float()).abs().max() / ref.float().abs().max()
                assert err < 2e-2, f"{name} {backend} batch {m}: relative error {err:.3g}"
                times[backend] = timed(lambda x=x, ws=ws: F.linear(x, ws))
            cells = [f"{times[b] * 1e6:.1f}" if b in times else "-" for b in sparse]
            best = dense_t / min(times.values()) if times else float("nan")
            print(f"| {name} ({k} -> {n}) | {m} | {dense_t * 1e6:.1f} | {' | '.join(cells)} | "
                  f"{best:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
