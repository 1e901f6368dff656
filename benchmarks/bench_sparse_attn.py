"""Block-sparse attention (Longformer, BigBird) against dense causal attention: time and memory.

    python benchmarks/bench_sparse_attn.py                  # GPU: 4k, 8k, 16k tokens
    python benchmarks/bench_sparse_attn.py --tiny           # CPU: Triton's interpreter, 256 tokens

One prefill of B=1, 16 query heads, 8 KV heads, head_dim 128, bfloat16, blocks of 64 tokens.
Rows: dense causal flash attention (SDPA, is_causal: no mask), dense attention under the
pattern's [T, T] mask (SDPA with attn_mask: what a mask-based implementation costs), and the
Triton block-sparse kernel. Columns: the share of causal key blocks the pattern keeps, median
time (triton.testing.do_bench), the speedup over dense causal, the peak memory the call adds
(torch.cuda.max_memory_allocated beyond the inputs), and the largest error relative to the
masked dense result. Longformer: window of 4 blocks (256 tokens) behind, 1 global block;
BigBird: window 3, 2 global, 3 random blocks a row.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kiln.kernels.block_sparse_attention import (  # noqa: E402
    bigbird_layout,
    block_sparse_attention_ref,
    block_sparse_attention_triton,
    longformer_layout,
)

PATTERNS = {
    "longformer": functools.partial(longformer_layout, window=4, global_blocks=1),
    "bigbird": functools.partial(bigbird_layout, window=3, global_blocks=2, num_random=3),
}


def measure(fn, device: str) -> tuple[float, float]:
    """(median ms, peak MB the call adds beyond what is allocated before it)."""
    if device == "cuda":
        from triton.testing import do_bench

        fn()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return do_bench(fn, warmup=5, rep=30, return_mode="median"), peak
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[1], float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU-sized: 256 tokens, blocks of 16")
    ap.add_argument("--lengths", type=int, nargs="+", default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny or device == "cpu":
        lengths, block, hq, hkv, d, dtype = args.lengths or [256], 16, 2, 1, 16, torch.float32
    else:
        lengths, block, hq, hkv, d, dtype = args.lengths or [4096, 8192, 16384], 64, 16, 8, 128, \
            torch.bfloat16  # fmt: skip
    scale = d**-0.5
    print(
        f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (interpreter)'};"
        f" Hq={hq} Hkv={hkv} D={d} {str(dtype).removeprefix('torch.')} block={block}"
    )
    print(f"{'tokens':>7} {'attention':<22}{'blocks kept':>12}{'ms':>10}{'speedup':>9}"
          f"{'peak MB':>10}{'rel err':>10}")  # fmt: skip
    for t in lengths:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(1, t, hq, d, generator=g, device=device, dtype=dtype)
        k = torch.randn(1, t, hkv, d, generator=g, device=device, dtype=dtype)
        v = torch.randn(1, t, hkv, d, generator=g, device=device, dtype=dtype)

        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        flash = functools.partial(F.scaled_dot_product_attention, qt, kt, vt, is_causal=True,
                                  scale=scale, enable_gqa=True)  # fmt: skip
        dense_ms, dense_mb = measure(flash, device)
        print(f"{t:>7} {'dense causal (flash)':<22}{1:>12.3f}{dense_ms:>10.3f}{1:>8.2f}x"
              f"{dense_mb:>10.0f}{'':>10}")  # fmt: skip
        n = -(-t // block)
        causal_blocks = n * (n + 1) / 2
        for name, make in PATTERNS.items():
            layout = make(n)
            kept = layout.sum().item() / causal_blocks
            ref_fn = functools.partial(block_sparse_attention_ref, q, k, v, layout, block, scale)
            fn = functools.partial(block_sparse_attention_triton, q, k, v, layout, block, scale)
            ref = ref_fn().float()
            err = ((fn().float() - ref).abs().max() / ref.abs().max()).item()
            rows = (
                (f"{name} masked dense", ref_fn, ""),
                (f"{name} block-sparse", fn, f"{err:.1e}"),
            )
            for label, f, err_text in rows:
                ms, mb = measure(f, device)
                print(f"{t:>7} {label:<22}{kept:>12.3f}{ms:>10.3f}{dense_ms / ms:>8.2f}x"
                      f"{mb:>10.0f}{err_text:>10}")  # fmt: skip


if __name__ == "__main__":
    main()
