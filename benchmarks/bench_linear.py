"""How close the decode step's GEMMs come to memory bandwidth (GPU): cuBLAS (F.linear) and
kiln's Triton GEMVs (kiln.kernels.gemv), alone and with the norm / SiLU-mul fused in.

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
    from kiln.kernels import gemv
    from kiln.kernels.rmsnorm import rmsnorm_triton
    from kiln.kernels.silu_and_mul import silu_and_mul_triton

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
    bf16 = dict(dtype=torch.bfloat16, device="cuda")
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    print("| layer | K -> N | batch | cuBLAS us | GB/s | Triton GEMV us | GB/s | best sweep us |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (k, n) in shapes.items():
        w = torch.randn(n, k, **bf16) * 0.02
        best_cfg = None
        for m in (1, 8, 64, 256):
            x = torch.randn(m, k, **bf16)
            t = graph_time(functools.partial(F.linear, x, w))
            row = f"| {name} | {k} -> {n} | {m} | {t * 1e6:.1f} | {w.numel() * 2 / t / 1e9:.0f} |"
            if m <= 16 and name != "lm_head":
                tg = graph_time(functools.partial(gemv.gemv_triton, x, w))
                if best_cfg is None:  # sweep at batch 1, reuse at 8
                    sweep = [
                        (graph_time(functools.partial(gemv.gemv_triton, x, w, config=cfg)), cfg)
                        for cfg in gemv.sweep_configs()
                    ]
                    best_cfg = min(sweep, key=lambda tc: tc[0])[1]
                tb = graph_time(functools.partial(gemv.gemv_triton, x, w, config=best_cfg))
                row += f" {tg * 1e6:.1f} | {w.numel() * 2 / tg / 1e9:.0f} |"
                row += f" {tb * 1e6:.1f} {best_cfg} |"
            else:
                row += " | | |"
            print(row, flush=True)
    print("\nfused prologues (one decode layer's neighbours), us per call:")
    print("| op | batch | unfused (Triton elementwise + cuBLAS) | fused Triton GEMV |")
    print("|---|---|---|---|")
    for m in (1, 8):
        x, res = torch.randn(m, h, **bf16), torch.randn(m, h, **bf16)
        nw = torch.randn(h, **bf16)
        for name in ("qkv", "gate_up"):
            k, n = shapes[name]
            w = torch.randn(n, k, **bf16) * 0.02

            def unfused(x=x, w=w, nw=nw, res=res):
                y, _ = rmsnorm_triton(x, nw, 1e-6, res)
                return F.linear(y, w)

            fused = functools.partial(gemv.rmsnorm_gemv_triton, x, res, nw, 1e-6, w)
            print(
                f"| add + rmsnorm + {name} | {m} | {graph_time(unfused) * 1e6:.1f} | "
                f"{graph_time(fused) * 1e6:.1f} |"
            )
        gu = torch.randn(m, 2 * inter, **bf16)
        w = torch.randn(h, inter, **bf16) * 0.02

        def unfused_down(gu=gu, w=w):
            return F.linear(silu_and_mul_triton(gu), w)

        fused = functools.partial(gemv.silu_mul_gemv_triton, gu, w)
        print(
            f"| silu_and_mul + down | {m} | {graph_time(unfused_down) * 1e6:.1f} | "
            f"{graph_time(fused) * 1e6:.1f} |"
        )


def layer_chain(m: int = 1, layers: int = 28) -> None:
    """The decode step's projections for all layers, each layer's own weights (so they come
    from HBM, as in the model): add+norm -> qkv, o, add+norm -> gate_up, silu-mul -> down,
    cuBLAS with the separate Triton norm / SiLU-mul kernels vs the fused Triton GEMVs, with
    and without programmatic dependent launch. Prints us per layer and weight TB/s."""
    from kiln.kernels import _triton, gemv
    from kiln.kernels.rmsnorm import rmsnorm_triton
    from kiln.kernels.silu_and_mul import silu_and_mul_triton

    c = QWEN3_0_6B
    h, d = c["hidden_size"], c["head_dim"]
    q, kv, inter = (
        c["num_attention_heads"] * d,
        c["num_key_value_heads"] * d,
        c["intermediate_size"],
    )
    bf16 = dict(dtype=torch.bfloat16, device="cuda")
    ws = [
        [
            torch.randn(n, k, **bf16) * 0.02
            for k, n in ((h, q + 2 * kv), (q, h), (h, 2 * inter), (inter, h))
        ]
        for _ in range(layers)
    ]
    nw = torch.randn(h, **bf16)
    x0, r0 = torch.randn(m, h, **bf16), torch.randn(m, h, **bf16)
    nbytes = sum(w.numel() * 2 for layer in ws for w in layer)

    def cublas():
        x, r = x0, r0
        for wq, wo, wgu, wd in ws:
            y, r = rmsnorm_triton(x, nw, 1e-6, r)
            qkv = F.linear(y, wq)
            y, r = rmsnorm_triton(F.linear(qkv[:, :q], wo), nw, 1e-6, r)
            x = F.linear(silu_and_mul_triton(F.linear(y, wgu)), wd)

    def fused(kind: str, elements):  # elements: one count, or (qkv, o, gate_up, down)
        def cfg(w):
            n, k = w.shape
            if kind == "resident":
                e = elements
                if isinstance(elements, tuple):
                    shapes = [(q + 2 * kv, h), (h, q), (2 * inter, h), (h, inter)]
                    e = elements[shapes.index((n, k))]
                return gemv.resident_config(m, n, k, e)
            return dict(BLOCK_N=4, BLOCK_K=min(1024, k), num_warps=4, num_stages=2)

        x, r = x0, r0
        for wq, wo, wgu, wd in ws:
            qkv, r = gemv.rmsnorm_gemv_triton(x, r, nw, 1e-6, wq, config=cfg(wq))
            o = gemv.gemv_triton(qkv[:, :q], wo, config=cfg(wo))
            gu, r = gemv.rmsnorm_gemv_triton(o, r, nw, 1e-6, wgu, config=cfg(wgu))
            x = gemv.silu_mul_gemv_triton(gu, wd, config=cfg(wd))

    print(f"\n{layers} layers of projections, batch {m} (us per layer, weight TB/s):")
    print("| path | us/layer | TB/s |")
    print("|---|---|---|")
    variants = [("cuBLAS + norm/silu kernels", cublas, True)]
    for elements in (8192, 16384, 32768):
        for pdl in (False, True):
            variants.append(
                (
                    f"resident GEMV, {elements} weights/program, PDL {pdl}",
                    functools.partial(fused, "resident", elements),
                    pdl,
                )  # fmt: skip
            )
    per_projection = [
        (16384, 8192, 16384, 16384),
        (16384, 8192, 16384, 8192),
        (16384, 16384, 32768, 16384),
        (8192, 8192, 16384, 8192),
        (16384, 4096, 16384, 8192),
    ]
    for per in per_projection:
        name = f"resident GEMV, qkv/o/gate_up/down {per}, PDL True"
        variants.append((name, functools.partial(fused, "resident", per), True))
    variants.append(
        ("previous Triton GEMV (chunked K)", functools.partial(fused, "chunked", 0), False)
    )
    for name, fn, pdl in variants:
        _triton.PDL_ENABLED = pdl
        try:
            t = graph_time(fn, reps=1)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"| {name} | failed: {type(e).__name__}: {str(e)[:120]} | |", flush=True)
            continue
        print(f"| {name} | {t / layers * 1e6:.2f} | {nbytes / t / 1e12:.2f} |", flush=True)
    _triton.PDL_ENABLED = True
    if m == 1:  # the LM head (HBM-bound at any config: 311 MB of bf16 weights)
        w = torch.randn(c["vocab_size"], h, **bf16) * 0.02
        print("\n| LM head, batch 1 | us | TB/s |\n|---|---|---|")
        runs = [("cuBLAS", functools.partial(F.linear, x0, w))]
        for elements in (8192, 16384, 32768):
            cfg = gemv.resident_config(1, w.shape[0], h, elements)
            runs.append(
                (f"resident {elements}", functools.partial(gemv.gemv_triton, x0, w, config=cfg))
            )
        for name, fn in runs:
            t = graph_time(fn, reps=3)
            print(f"| {name} | {t * 1e6:.1f} | {w.numel() * 2 / t / 1e12:.2f} |", flush=True)


if __name__ == "__main__":
    import sys

    if "--chain" in sys.argv:
        for batch in (1, 4):
            layer_chain(batch)
    else:
        main()
