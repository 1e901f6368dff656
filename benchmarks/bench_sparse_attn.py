"""Block-sparse attention (Longformer, BigBird) against dense causal attention: time and memory,
forward (prefill) and forward + backward (training).

    python benchmarks/bench_sparse_attn.py                  # GPU: 4k, 8k, 16k tokens
    python benchmarks/bench_sparse_attn.py --tiny           # CPU: Triton's interpreter, 256 tokens

One sequence of B=1, 16 query heads, 8 KV heads, head_dim 128, bfloat16, blocks of 64 tokens.
Rows, for each pass (fwd: the attention alone; fwd+bwd: it and the gradients dq, dk, dv of
a random output gradient): dense causal flash attention (SDPA, is_causal: no mask), dense
attention under the pattern's [T, T] mask (SDPA with attn_mask: what a mask-based
implementation costs; the training path before the Triton backward), and the Triton
block-sparse kernels. Columns: the share of causal key blocks the pattern keeps, median time
(triton.testing.do_bench), the speedup over dense causal in the same pass, the peak memory
the call adds (torch.cuda.max_memory_allocated beyond the inputs), and the largest error
relative to the masked dense result (the output; fwd+bwd: the worst of dq, dk, dv).
Longformer: window of 4 blocks (256 tokens) behind, 1 global block; BigBird: window 3,
2 global, 3 random blocks a row. A row that runs out of GPU memory says OOM.
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
    BlockSparseAttentionFn,
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


def causal_flash(q, k, v, scale: float) -> torch.Tensor:
    """Dense causal attention through SDPA (flash on CUDA); q [B, T, Hq, D], k/v [B, T, Hkv, D]."""
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def rel_err(actual, expected) -> float:
    """The largest |actual - expected| relative to expected's largest magnitude, over pairs."""
    return max(
        ((a.float() - e.float()).abs().max() / e.float().abs().max()).item()
        for a, e in zip(actual, expected)
    )


def with_layout(attn, layout, block: int, scale: float):
    """attn(q, k, v, layout, block, scale, causal=True) as a function of q, k, v."""
    return lambda q, k, v: attn(q, k, v, layout, block, scale, True)


def bench_pass(t, q, k, v, layouts, block, scale, device, backward: bool) -> None:
    """Print one sequence length's rows for one pass: forward, or forward and backward."""
    if backward:
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        grad_out = torch.randn_like(q)

        def call(attn):  # () -> (dq, dk, dv)
            return lambda: torch.autograd.grad(attn(q, k, v), (q, k, v), grad_out)
    else:

        def call(attn):  # () -> (out,)
            return lambda: (attn(q, k, v),)

    kind = "fwd+bwd" if backward else "fwd"
    dense_ms, dense_mb = measure(call(functools.partial(causal_flash, scale=scale)), device)
    print(f"{t:>7} {kind:<8}{'dense causal (flash)':<24}{1:>12.3f}{dense_ms:>10.3f}{1:>8.2f}x"
          f"{dense_mb:>10.0f}{'':>10}")  # fmt: skip
    n = -(-t // block)
    for name, layout in layouts.items():
        kept = layout.sum().item() / (n * (n + 1) / 2)
        masked = call(with_layout(block_sparse_attention_ref, layout, block, scale))
        kernel = BlockSparseAttentionFn.apply if backward else block_sparse_attention_triton
        sparse = call(with_layout(kernel, layout, block, scale))
        try:
            err = f"{rel_err(sparse(), masked()):.1e}"
        except torch.OutOfMemoryError:  # the masked dense one, at 16k
            err = "n/a"
        for label, f, err_text in ((f"{name} masked dense", masked, ""),
                                   (f"{name} block-sparse", sparse, err)):  # fmt: skip
            try:
                ms, mb = measure(f, device)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                print(f"{t:>7} {kind:<8}{label:<24}{kept:>12.3f}{'OOM':>10}")
                continue
            print(f"{t:>7} {kind:<8}{label:<24}{kept:>12.3f}{ms:>10.3f}{dense_ms / ms:>8.2f}x"
                  f"{mb:>10.0f}{err_text:>10}")  # fmt: skip


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
    print(f"{'tokens':>7} {'pass':<8}{'attention':<24}{'blocks kept':>12}{'ms':>10}{'speedup':>9}"
          f"{'peak MB':>10}{'rel err':>10}")  # fmt: skip
    for t in lengths:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(1, t, hq, d, generator=g, device=device, dtype=dtype)
        k = torch.randn(1, t, hkv, d, generator=g, device=device, dtype=dtype)
        v = torch.randn(1, t, hkv, d, generator=g, device=device, dtype=dtype)
        layouts = {name: make(-(-t // block)) for name, make in PATTERNS.items()}
        for backward in (False, True):
            bench_pass(t, q, k, v, layouts, block, scale, device, backward)


if __name__ == "__main__":
    main()
