"""The CUDA C++ paged decode attention against the Triton kernel and the torch reference (CUDA).

    python benchmarks/bench_cuda_attn.py

Shapes as bench_kernels.py (Qwen3-0.6B: Hq=16, Hkv=8, head_dim=128, bfloat16, KV block size 16),
batch 1, 32 and 256 at contexts of 1024 and 8192 tokens. Each kernel is timed with
triton.testing.do_bench (median, L2 flushed), launched eagerly and replayed from a CUDA graph
(as the engine runs decode), and its achieved bandwidth is the K/V bytes it must read over the
time, beside the device's copy bandwidth. The first call builds the extension (about a minute).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_kernels import BYTES, HKV, D, copy_bandwidth, decode_args, graph_ms, ms  # noqa: E402

from kiln.kernels.cuda_attention import load_extension, paged_decode_attention_cuda  # noqa: E402
from kiln.kernels.paged_decode_attention import (  # noqa: E402
    paged_decode_attention_ref,
    paged_decode_attention_triton,
)


def bench(batch: int, length: int, copy_gbs: float) -> str:
    args = decode_args(batch, length)
    cuda_fn = lambda: paged_decode_attention_cuda(*args)
    triton_fn = lambda: paged_decode_attention_triton(*args)
    err = (cuda_fn().float() - triton_fn().float()).abs().max().item()
    ref = ms(lambda: paged_decode_attention_ref(*args)) if batch <= 32 else float("nan")
    t_cuda, t_triton = ms(cuda_fn), ms(triton_fn)
    g_cuda, g_triton = graph_ms(cuda_fn), graph_ms(triton_fn)
    gbs = 2 * batch * length * HKV * D * BYTES / g_cuda / 1e6
    return (f"{batch:>5} {length:>5} {1e3 * t_cuda:>8.1f} {1e3 * t_triton:>9.1f} "
            f"{1e3 * ref:>9.1f} {1e3 * g_cuda:>10.1f} {1e3 * g_triton:>12.1f} "
            f"{gbs:>9.0f} {100 * gbs / copy_gbs:>6.0f}% {err:>10.2e}")  # fmt: skip


def main() -> None:
    assert torch.cuda.is_available(), "bench_cuda_attn needs a CUDA device"
    torch.manual_seed(0)
    load_extension()
    copy_gbs = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"copy bandwidth {copy_gbs:.0f} GB/s")  # fmt: skip
    head = (
        f"{'batch':>5} {'ctx':>5} {'cuda us':>8} {'triton us':>9} {'torch us':>9} "
        f"{'cuda graph':>10} {'triton graph':>12} {'cuda GB/s':>9} {'copy':>7} {'|cuda-tri|':>10}"
    )
    print(head)
    print("-" * len(head))
    for batch in (1, 32, 256):
        for length in (1024, 8192):
            print(bench(batch, length, copy_gbs), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
