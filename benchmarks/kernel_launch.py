"""Launch one kiln Triton kernel on Qwen3-0.6B's shapes: what scripts/profile_kernel.sh runs
under Nsight Compute.

    python benchmarks/kernel_launch.py KERNEL [--batch 32] [--ctx 1024] [--launches 3]

KERNEL: paged_decode_attention, varlen_prefill_attention, rmsnorm, silu_and_mul, rope,
store_kvcache. The kernel runs --launches times (ncu profiles the last one, inside the NVTX
range "profile": the first ones compile), and its output is checked against its torch
reference once. On a machine without CUDA it runs under Triton's interpreter (TRITON_INTERPRET=1,
set here) at the sizes given: tiny ones, to know the launcher works.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before kiln.kernels defines its kernels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from shapes import QWEN3_0_6B  # noqa: E402

from kiln.kernels.common import PagedKV  # noqa: E402

HQ, HKV = QWEN3_0_6B["num_attention_heads"], QWEN3_0_6B["num_key_value_heads"]
D, HIDDEN, INTER = (
    QWEN3_0_6B["head_dim"],
    QWEN3_0_6B["hidden_size"],
    QWEN3_0_6B["intermediate_size"],
)
BLOCK = 16


def paged_kv(batch: int, ctx: int, dtype, device) -> PagedKV:
    """`batch` sequences of `ctx` tokens each in a shuffled paged cache."""
    per_seq = -(-ctx // BLOCK)
    order = torch.randperm(batch * per_seq, device=device).int()
    tables = order.view(batch, per_seq)
    k = torch.randn(batch * per_seq, BLOCK, HKV, D, dtype=dtype, device=device)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    return PagedKV(k, torch.randn_like(k), tables, lens)


def kernel_inputs(name: str, batch: int, ctx: int, dtype, device):
    """call(fn) -> fn's output on inputs built for kernel `name` (fresh copies of what the
    kernel writes in place, so the Triton kernel and the reference see the same inputs)."""
    r = lambda *shape: torch.randn(*shape, dtype=dtype, device=device)  # noqa: E731
    if name == "paged_decode_attention":
        q, kv = r(batch, HQ, D), paged_kv(batch, ctx, dtype, device)
        return lambda fn: fn(q, kv, D**-0.5)
    if name == "varlen_prefill_attention":
        q, kv = r(batch * ctx, HQ, D), paged_kv(batch, ctx, dtype, device)
        cu = torch.arange(0, batch * ctx + 1, ctx, dtype=torch.int32, device=device)
        return lambda fn: fn(q, kv, cu, D**-0.5)
    if name == "rmsnorm":
        x, res, w = r(batch, HIDDEN), r(batch, HIDDEN), r(HIDDEN)
        return lambda fn: fn(x, w, 1e-6, res.clone())
    if name == "silu_and_mul":
        x = r(batch, 2 * INTER)
        return lambda fn: fn(x)
    if name == "rope":
        q, k = r(batch, HQ, D), r(batch, HKV, D)
        freqs = torch.outer(torch.arange(ctx + 1, device=device).float(),
                            torch.rand(D // 2, device=device))  # fmt: skip
        cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
        pos = torch.randint(0, ctx + 1, (batch,), device=device)
        return lambda fn: fn(q.clone(), k.clone(), pos, cos_sin)
    assert name == "store_kvcache", name
    k, v = r(batch, HKV, D), r(batch, HKV, D)
    cache = torch.zeros(2, -(-batch // BLOCK) + 4, BLOCK, HKV, D, dtype=dtype, device=device)
    slots = torch.randperm(cache.shape[1] * BLOCK, device=device)[:batch]

    def call(fn):
        k_cache, v_cache = cache.clone().unbind(0)
        fn(k, v, k_cache, v_cache, slots)
        return k_cache, v_cache

    return call


KERNELS = ["paged_decode_attention", "varlen_prefill_attention", "rmsnorm", "silu_and_mul",
           "rope", "store_kvcache"]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kernel", choices=KERNELS)
    p.add_argument("--batch", type=int, default=32, help="sequences (tokens for the elementwise)")
    p.add_argument("--ctx", type=int, default=1024, help="context length of each sequence")
    p.add_argument("--launches", type=int, default=3)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    call = kernel_inputs(args.kernel, args.batch, args.ctx, dtype, device)
    module = importlib.import_module(f"kiln.kernels.{args.kernel}")
    kernel, reference = (getattr(module, f"{args.kernel}_{s}") for s in ("triton", "ref"))
    for i in range(args.launches):
        last = device == "cuda" and i == args.launches - 1
        if last:  # the range ncu profiles (--nvtx-include profile/): the warm last launch
            torch.cuda.nvtx.range_push("profile")
        out = call(kernel)
        if last:
            torch.cuda.nvtx.range_pop()
    if device == "cuda":
        torch.cuda.synchronize()
    ref = call(reference)
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    for o, rr in zip(outs, refs):
        torch.testing.assert_close(o.float(), rr.float(), atol=tol, rtol=tol)
    print(f"{args.kernel}: {args.launches} launches on {device} "
          f"(batch {args.batch}, ctx {args.ctx}), output matches the reference")  # fmt: skip


if __name__ == "__main__":
    main()
