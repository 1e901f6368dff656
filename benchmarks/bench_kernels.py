"""Triton kernels against their torch references at Qwen3-0.6B sizes (CUDA only).

    python benchmarks/bench_kernels.py [--sweep] [--mixed-only]

Shapes: Hq=16, Hkv=8, head_dim=128, bfloat16, KV block size 16. Each row times the Triton
kernel and a torch baseline (the kernel's reference, or SDPA on dense K/V for attention) with
triton.testing.do_bench (median; the L2 cache is flushed between runs), and gives the Triton
kernel's achieved memory bandwidth (bytes it must move / time) beside the device's measured
copy bandwidth, or TFLOP/s for prefill attention. Decode rows are also timed replayed from a
CUDA graph, as the engine runs them: small batches are otherwise bound by Python launch
overhead, not by the GPU. --sweep also times other launch configs of the attention kernels.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from kiln.kernels.common import PagedKV  # noqa: E402
from kiln.kernels.mixed_attention import mixed_attention_triton  # noqa: E402
from kiln.kernels.paged_decode_attention import (  # noqa: E402
    choose_num_splits,
    paged_decode_attention_ref,
    paged_decode_attention_triton,
)
from kiln.kernels.rmsnorm import rmsnorm_ref, rmsnorm_triton  # noqa: E402
from kiln.kernels.rope import rope_ref, rope_triton  # noqa: E402
from kiln.kernels.silu_and_mul import silu_and_mul_ref, silu_and_mul_triton  # noqa: E402
from kiln.kernels.store_kvcache import store_kvcache_ref, store_kvcache_triton  # noqa: E402
from kiln.kernels.varlen_prefill_attention import (  # noqa: E402
    varlen_prefill_attention_ref,
    varlen_prefill_attention_triton,
)

HQ, HKV, D, BLOCK, DTYPE, DEV = 16, 8, 128, 16, torch.bfloat16, "cuda"
HIDDEN, INTER = 1024, 3072
BYTES = 2  # bfloat16


def ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def graph_ms(fn) -> float:
    """Median ms of fn replayed from a CUDA graph (no Python or launch overhead)."""
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return ms(graph.replay)


def copy_bandwidth() -> float:
    """GB/s of a device-to-device copy, counting bytes read and written."""
    x = torch.empty(2**28, dtype=DTYPE, device=DEV)
    y = torch.empty_like(x)
    return 2 * x.numel() * BYTES / ms(lambda: y.copy_(x)) / 1e6


def paged(lengths: list[int]):
    """Caches holding `lengths` tokens per sequence, blocks shuffled; tables int32."""
    needed = [triton.cdiv(n, BLOCK) for n in lengths]
    order = torch.randperm(sum(needed), device=DEV).int()
    tables = torch.zeros(len(lengths), max(needed), dtype=torch.int32, device=DEV)
    used = 0
    for b, n in enumerate(needed):
        tables[b, :n] = order[used : used + n]
        used += n
    shape = (sum(needed), BLOCK, HKV, D)
    k_cache = torch.randn(shape, dtype=DTYPE, device=DEV)
    return k_cache, torch.randn_like(k_cache), tables


def dense_kv(lengths: list[int]):
    """Contiguous [B, Hkv, L, D] K/V for the SDPA baseline (equal lengths only)."""
    shape = (len(lengths), HKV, lengths[0], D)
    return torch.randn(shape, dtype=DTYPE, device=DEV), torch.randn(shape, dtype=DTYPE, device=DEV)


def decode_args(batch: int, length: int):
    lengths = [length] * batch
    k_cache, v_cache, tables = paged(lengths)
    q = torch.randn(batch, HQ, D, dtype=DTYPE, device=DEV)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEV)
    return q, PagedKV(k_cache, v_cache, tables, lens), D**-0.5


def prefill_args(q_lens: list[int], lengths: list[int]):
    k_cache, v_cache, tables = paged(lengths)
    q = torch.randn(sum(q_lens), HQ, D, dtype=DTYPE, device=DEV)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEV)
    return q, PagedKV(k_cache, v_cache, tables, lens), cu, D**-0.5


def bench_decode(rows, batch: int, length: int, num_splits: int | None = None):
    lengths = [length] * batch
    args = decode_args(batch, length)
    q, tables = args[0], args[1].block_tables
    triton_fn = lambda: paged_decode_attention_triton(*args, num_splits=num_splits)
    k, v = dense_kv(lengths)
    sdpa_fn = lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)
    ref = ms(lambda: paged_decode_attention_ref(*args)) if batch <= 32 else float("nan")
    splits = num_splits or choose_num_splits(batch, HKV, tables.shape[1] * BLOCK, q.device)
    moved = 2 * sum(lengths) * HKV * D * BYTES
    name = f"decode B={batch} ctx={length} splits={splits}"
    rows.append((name, ms(triton_fn), ref, ms(sdpa_fn), moved, None))
    rows.append((name + " graph", graph_ms(triton_fn), ref, graph_ms(sdpa_fn), moved, None))


def bench_prefill(rows, q_lens: list[int], lengths: list[int]):
    args = prefill_args(q_lens, lengths)
    q = args[0]
    t = ms(lambda: varlen_prefill_attention_triton(*args))
    ref = ms(lambda: varlen_prefill_attention_ref(*args))
    # SDPA baseline: the same shapes, dense, for fresh prompts only
    sdpa = float("nan")
    if q_lens == lengths and len(set(q_lens)) == 1:
        qd = q.view(len(q_lens), q_lens[0], HQ, D).transpose(1, 2)
        k, v = dense_kv(lengths)
        sdpa = ms(lambda: F.scaled_dot_product_attention(qd, k, v, is_causal=True, enable_gqa=True))
    # causal pairs (query, visible key) summed over sequences; 2 matmuls x 2 flops each
    pairs = sum(n * (c - n) + n * (n + 1) / 2 for n, c in zip(q_lens, lengths))
    flops = 4 * pairs * HQ * D
    name = f"prefill {len(q_lens)}x{q_lens[0]} q, ctx {lengths[0]}"
    rows.append((name, t, ref, sdpa, None, flops))


def bench_mixed(rows, decodes: int, length: int, chunk: int):
    """A served steady-state step as a mixed CUDA graph runs it: `decodes` one-query
    sequences of context `length` beside one fresh `chunk`-token prompt, timed from a graph:
    varlen prefill over every row (the old path) against kiln.kernels.mixed_attention."""
    q_lens, lengths = [1] * decodes + [chunk], [length] * decodes + [chunk]
    args = prefill_args(q_lens, lengths)
    moved = 2 * sum(lengths) * HKV * D * BYTES
    name = f"mixed {decodes}x1 + 1x{chunk} q, ctx {length}"
    old = graph_ms(lambda: varlen_prefill_attention_triton(*args))
    new = graph_ms(lambda: mixed_attention_triton(*args))
    nan = float("nan")
    rows.append((name + " varlen", old, nan, nan, moved, None))
    rows.append((name + " mixed", new, old, nan, moved, None))


def bench_elementwise(rows, n: int):
    x, residual = torch.randn(2, n, HIDDEN, dtype=DTYPE, device=DEV).unbind(0)
    w = torch.randn(HIDDEN, dtype=DTYPE, device=DEV)
    rows.append((
        f"rmsnorm+residual N={n} H={HIDDEN}",
        ms(lambda: rmsnorm_triton(x, w, 1e-6, residual)),
        ms(lambda: rmsnorm_ref(x, w, 1e-6, residual)),
        float("nan"), 5 * n * HIDDEN * BYTES, None,
    ))  # fmt: skip
    gate_up = torch.randn(n, 2 * INTER, dtype=DTYPE, device=DEV)
    rows.append((
        f"silu_and_mul N={n} I={INTER}",
        ms(lambda: silu_and_mul_triton(gate_up)),
        ms(lambda: silu_and_mul_ref(gate_up)),
        float("nan"), 3 * n * INTER * BYTES, None,
    ))  # fmt: skip
    q = torch.randn(n, HQ, D, dtype=DTYPE, device=DEV)
    k = torch.randn(n, HKV, D, dtype=DTYPE, device=DEV)
    freqs = torch.outer(torch.arange(40960, device=DEV).float(), torch.rand(D // 2, device=DEV))
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    pos = torch.randint(0, 40960, (n,), device=DEV)
    rows.append((
        f"rope N={n}",
        ms(lambda: rope_triton(q, k, pos, cos_sin)),
        ms(lambda: rope_ref(q, k, pos, cos_sin)),
        float("nan"), 2 * n * (HQ + HKV) * D * BYTES + n * D * 4, None,
    ))  # fmt: skip
    kv = torch.randn(2, n, HKV, D, dtype=DTYPE, device=DEV)
    k_cache, v_cache = torch.empty(2, triton.cdiv(n, BLOCK) + 8, BLOCK, HKV, D, dtype=DTYPE,
                                   device=DEV).unbind(0)  # fmt: skip
    slots = torch.randperm(k_cache.shape[0] * BLOCK, device=DEV)[:n]
    rows.append((
        f"store_kvcache N={n}",
        ms(lambda: store_kvcache_triton(kv[0], kv[1], k_cache, v_cache, slots)),
        ms(lambda: store_kvcache_ref(kv[0], kv[1], k_cache, v_cache, slots)),
        float("nan"), 4 * n * HKV * D * BYTES, None,
    ))  # fmt: skip


def sweep_launch_configs() -> None:
    """Time the attention kernels under other tile sizes, warps and stages than the defaults."""
    decode = importlib.import_module("kiln.kernels.paged_decode_attention")
    prefill = importlib.import_module("kiln.kernels.varlen_prefill_attention")
    cases = [("decode B=1 ctx=8192", decode_args(1, 8192)),
             ("decode B=256 ctx=4096", decode_args(256, 4096))]  # fmt: skip
    default = dict(decode.CUDA_CONFIG)
    for block_n, warps, stages in [(64, 4, 2), (32, 4, 2), (64, 4, 3), (128, 4, 2), (64, 8, 2)]:
        decode.CUDA_CONFIG.update(BLOCK_N=block_n, num_warps=warps, num_stages=stages)
        times = "  ".join(
            f"{name}: {1e3 * ms(lambda a=a: decode.paged_decode_attention_triton(*a)):7.1f} us"
            for name, a in cases
        )
        print(f"decode BLOCK_N={block_n:<3} warps={warps} stages={stages}  {times}")
    decode.CUDA_CONFIG.update(default)
    cases = [("4x1024", prefill_args([1024] * 4, [1024] * 4)),
             ("4x512 after 1536", prefill_args([512] * 4, [2048] * 4))]  # fmt: skip
    default = prefill.CUDA_CONFIGS[D]
    for bm, bn, warps, stages in [
        (64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 2),
        (128, 32, 4, 3), (64, 32, 4, 4),
    ]:  # fmt: skip
        prefill.CUDA_CONFIGS[D] = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
        times = "  ".join(
            f"{name}: {1e3 * ms(lambda a=a: prefill.varlen_prefill_attention_triton(*a)):7.1f} us"
            for name, a in cases
        )
        print(f"prefill BLOCK_M={bm:<3} BLOCK_N={bn:<3} warps={warps} stages={stages}  {times}")
    prefill.CUDA_CONFIGS[D] = default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time other launch configs")
    parser.add_argument("--mixed-only", action="store_true", help="only the mixed-step rows")
    args = parser.parse_args()
    sweep = args.sweep
    assert torch.cuda.is_available(), "bench_kernels needs a CUDA device"
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}, copy bandwidth {copy_gbs:.0f} GB/s")  # fmt: skip
    rows = []
    if not args.mixed_only:
        for batch in (1, 32, 256):
            for length in (1024, 8192):
                bench_decode(rows, batch, length)
        bench_decode(rows, 1, 8192, num_splits=1)  # what split-KV buys at batch 1
        bench_prefill(rows, [1024] * 4, [1024] * 4)
        bench_prefill(rows, [512] * 4, [2048] * 4)  # chunks after a 1536-token cached prefix
    # the served steady state (256 in / 128 out: contexts 256..384), and a long-context one;
    # "ref us" of the mixed rows is the varlen-only row's time
    bench_mixed(rows, 253, 320, 256)
    bench_mixed(rows, 16, 4096, 512)
    if not args.mixed_only:
        bench_elementwise(rows, 4096)
        bench_elementwise(rows, 32)

    head = f"{'kernel':<46} {'triton us':>10} {'ref us':>10} {'sdpa us':>10} {'x ref':>7}  achieved"
    print(head)
    print("-" * len(head))
    for name, t, ref, sdpa, moved, flops in rows:
        if moved is not None:
            gbs = moved / t / 1e6
            achieved = f"{gbs:.0f} GB/s ({100 * gbs / copy_gbs:.0f}% of copy)"
        else:
            achieved = f"{flops / t / 1e9:.0f} TFLOP/s"
        print(f"{name:<46} {1e3 * t:>10.1f} {1e3 * ref:>10.1f} {1e3 * sdpa:>10.1f} "
              f"{ref / t:>7.1f}  {achieved}")  # fmt: skip
    if sweep:
        print()
        sweep_launch_configs()


if __name__ == "__main__":
    main()
