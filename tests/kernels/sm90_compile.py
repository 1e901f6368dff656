"""Compile the engine's Triton kernels for an H100 (sm_90) on a machine without a GPU.

Run as a script, without TRITON_INTERPRET (the interpreter never builds the kernels, so a
kernel that only the GPU compiler rejects would pass every CPU test). A stand-in for Triton's
active driver reports an sm_90 target, and every launch becomes a warm-up (compile, do not
run); each launcher is then called with tiny CPU tensors, so every kernel variant it picks
goes through Triton's front end, its optimizer and ptxas. Outputs are never computed.

Prints one line per launcher and exits 1 if any failed (0 with "unsupported" when this
Triton's internals differ from what the stand-in needs, which a trivial kernel shows first:
the check cannot run here).

    python tests/kernels/sm90_compile.py
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]  # kiln; tests/quant_weights.py


def install_fake_driver() -> list[str]:
    """Make Triton compile every launch for sm_90 without running it; returns the list the
    compiled kernels' names are appended to."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class Sm90Driver:
        target = GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return self.target

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_interface(self):
            return torch.cuda

        def is_active(self):
            return True

    driver.set_active(Sm90Driver())
    compiled: list[str] = []
    run = JITFunction.run

    def warm_up_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append(self.fn.__name__)
        return kernel

    JITFunction.run = warm_up_only
    return compiled


def cases():
    """(name, thunk) per launcher call: the attention family at GQA, with splits and the
    last-block reduce, packed queries, windows and quantized pools; the fused layers, the
    sampler, the weight-only quantized GEMV and GEMM, the fused MoE, multi-LoRA, W8A8, the
    selective scan, block-sparse attention (backward too)."""
    from quant_weights import int_weight, packed_of

    from kiln.kernels.block_sparse_attention import BlockSparseAttentionFn
    from kiln.kernels.common import HeadLayout, PagedKV, QKNormRope
    from kiln.kernels.decode_qkv import paged_decode_qkv_triton
    from kiln.kernels.fused_moe import fused_moe_triton
    from kiln.kernels.gemv import gemv_triton
    from kiln.kernels.kv_quant import layer_scales
    from kiln.kernels.lora import lora_expand_triton, lora_shrink_triton
    from kiln.kernels.mixed_attention import mixed_attention_triton
    from kiln.kernels.paged_decode_attention import paged_decode_attention_triton
    from kiln.kernels.qkv_prepare import qkv_prepare_triton
    from kiln.kernels.quant_act import FP8, quantize_rows_ref, quantize_rows_triton
    from kiln.kernels.quant_linear import quant_matmul_triton
    from kiln.kernels.rmsnorm import rmsnorm_triton
    from kiln.kernels.rope import rope_triton
    from kiln.kernels.sample import sample_triton
    from kiln.kernels.selective_scan import selective_scan_triton, selective_state_update_triton
    from kiln.kernels.silu_and_mul import silu_and_mul_triton
    from kiln.kernels.store_kvcache import store_kvcache_triton
    from kiln.kernels.varlen_prefill_attention import varlen_prefill_attention_triton
    from kiln.kernels.w8a8_mm import w8a8_gemv_triton, w8a8_mm_triton
    from kiln.model.w8a8 import quantize_weight

    bf16, i32 = torch.bfloat16, torch.int32
    heads = HeadLayout(4, 2, 64)
    lens = torch.tensor([5, 9, 3], dtype=i32)
    tables = torch.zeros(3, 2, dtype=i32)
    slots = torch.arange(3)

    def kv(dtype=bf16, **kw):
        k = torch.zeros(8, 16, 2, 64, dtype=dtype)
        scales = layer_scales(torch.ones(2), torch.ones(2)) if dtype != bf16 else None
        return PagedKV(k, k.clone(), tables, lens, scales=scales, **kw)

    q1 = torch.zeros(3, 4, 64, dtype=bf16)  # one query a sequence
    qn = torch.zeros(11, 4, 64, dtype=bf16)  # packed: 1, 7, 3
    cu = torch.tensor([0, 1, 8, 11], dtype=i32)
    qkv = torch.zeros(3, heads.qkv_width, dtype=bf16)
    cos_sin = torch.zeros(32, 64)
    qk = QKNormRope(torch.ones(64, dtype=bf16), torch.ones(64, dtype=bf16), 1e-6, cos_sin)
    yield "decode", lambda: paged_decode_attention_triton(q1, kv(), 0.1, num_splits=1)
    yield "decode splits", lambda: paged_decode_attention_triton(q1, kv(), 0.1, 8, num_splits=4)
    yield (
        "decode last reduces",
        lambda: paged_decode_attention_triton(q1, kv(), 0.1, num_splits=4, last_reduces=True),
    )
    yield (
        "decode fp8 + scores",
        lambda: paged_decode_attention_triton(
            q1, kv(torch.float8_e4m3fn, scores=torch.zeros(8, 16)), 0.1
        ),
    )
    yield "prefill", lambda: varlen_prefill_attention_triton(qn, kv(), cu, 0.1)
    yield (
        "prefill int8 window",
        lambda: varlen_prefill_attention_triton(qn, kv(torch.int8), cu, 0.1, 16),
    )
    yield "mixed", lambda: mixed_attention_triton(qn, kv(), cu, 0.1, num_splits=1)
    yield "mixed splits", lambda: mixed_attention_triton(qn, kv(), cu, 0.1, num_splits=2)
    yield (
        "decode_qkv",
        lambda: paged_decode_qkv_triton(
            qkv, slots, heads, qk, kv(slot_mapping=slots), 0.1, num_splits=2
        ),
    )
    yield "qkv_prepare", lambda: qkv_prepare_triton(qkv, slots, heads, qk, kv(slot_mapping=slots))
    k = torch.zeros(3, 2, 64, dtype=bf16)
    yield "store_kvcache", lambda: store_kvcache_triton(k, k, kv().k_cache, kv().v_cache, slots)
    x = torch.zeros(3, 256, dtype=bf16)
    yield "rmsnorm", lambda: rmsnorm_triton(x, torch.ones(256, dtype=bf16), 1e-6)
    yield "rope", lambda: rope_triton(q1, k, slots, cos_sin)
    yield "silu_and_mul", lambda: silu_and_mul_triton(x)
    weight = torch.zeros(128, 256, dtype=bf16)
    yield "gemv", lambda: gemv_triton(x[:1], weight)
    logits = torch.zeros(3, 1000, dtype=bf16)
    temps, seeds = torch.ones(3), torch.zeros(3, dtype=torch.long)
    bitmask = torch.full((3, 32), -1, dtype=i32)
    yield "sample", lambda: sample_triton(logits, temps, seeds, bitmask=bitmask)
    yield "sample splits", lambda: sample_triton(logits, temps, seeds, num_splits=2)
    x16 = torch.zeros(16, 256, dtype=bf16)  # past the GEMV's rows
    quants = ((4, 128, True, False), (4, 64, False, True), (8, 32, True, False))
    for bits, group, sym, act in quants:
        w = packed_of(int_weight(256, 128, bits, group, sym, act), group)
        tag = f"w{bits} g{group}{' asym' if not sym else ''}{' act' if act else ''}"
        yield f"quant gemv {tag}", lambda w=w: quant_matmul_triton(x[:1], w)
        yield f"quant matmul {tag}", lambda w=w: quant_matmul_triton(x16, w)
    w13, w2 = torch.zeros(4, 256, 256, dtype=bf16), torch.zeros(4, 256, 128, dtype=bf16)
    topk = torch.tensor([[0, 1], [2, 3], [1, 2]]), torch.full((3, 2), 0.5)
    yield "fused_moe", lambda: fused_moe_triton(x, w13, w2, topk[1], topk[0])
    a, b = torch.zeros(2, 16, 256, dtype=bf16), torch.zeros(2, 128, 16, dtype=bf16)
    lora_slots = torch.tensor([0, -1, 1], dtype=i32)
    y = torch.zeros(2, 3, 16)
    yield "lora shrink", lambda: lora_shrink_triton(x, a, lora_slots)
    yield (
        "lora expand",
        lambda: lora_expand_triton(y, b, lora_slots, torch.zeros(3, 128, dtype=bf16)),
    )
    for qdtype in (torch.int8, FP8):
        yield f"quantize rows {qdtype}", lambda q=qdtype: quantize_rows_triton(x, q)
        w8 = quantize_weight(torch.zeros(128, 256), qdtype)
        xq, xs = quantize_rows_ref(x16.float(), qdtype)
        yield (
            f"w8a8 gemm {qdtype}",
            lambda w8=w8, xq=xq, xs=xs: w8a8_mm_triton(
                xq, xs, w8.weight, w8.weight_scale, bf16, None
            ),
        )
        yield (
            f"w8a8 gemv {qdtype}",
            lambda w8=w8: w8a8_gemv_triton(x[:1], w8.weight, w8.weight_scale, None),
        )
    dim, nstate = 32, 16
    u = torch.zeros(7, dim, dtype=bf16)
    bc = torch.zeros(7, 1, nstate, dtype=bf16)
    a_log, d_skip, dt_bias = torch.zeros(dim, nstate), torch.zeros(dim), torch.zeros(dim)
    ssm_state, ssm_idx = torch.zeros(3, dim, nstate), torch.tensor([0, 2])
    ssm = (u, u, a_log, bc, bc, d_skip, u, dt_bias, True)
    yield (
        "selective scan",
        lambda: selective_scan_triton(
            *ssm, ssm_state, ssm_idx, torch.tensor([True, False]), torch.tensor([0, 3, 7])
        ),
    )
    yield (
        "selective state update",
        lambda: selective_state_update_triton(
            u[:2], u[:2], a_log, bc[:2], bc[:2], d_skip, u[:2], dt_bias, True, ssm_state, ssm_idx
        ),
    )
    qs = torch.zeros(1, 64, 4, 64, dtype=bf16, requires_grad=True)
    ks = torch.zeros(1, 64, 2, 64, dtype=bf16, requires_grad=True)
    layout = torch.ones(4, 4, dtype=torch.bool).tril()
    yield (
        "block-sparse attention fwd + bwd",
        lambda: BlockSparseAttentionFn.apply(qs, ks, ks, layout, 16, 0.125, True).sum().backward(),
    )


def self_check() -> None:
    """Compile a trivial kernel through the stand-in: if this fails, the harness (not a
    kiln kernel) does not fit this Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def _copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    x = torch.zeros(8)
    _copy[(1,)](x, x, 8, BLOCK=8)


def main() -> int:
    try:
        compiled = install_fake_driver()
        self_check()
    except Exception as e:  # the stand-in does not fit this Triton's internals
        print(f"unsupported: this Triton's internals differ ({e!r})")
        return 0
    failed = []
    for name, thunk in cases():
        before = len(compiled)
        try:
            thunk()
        except Exception:
            failed.append(name)
            print(f"FAILED {name}\n{traceback.format_exc()}")
            continue
        print(f"ok {name}: {', '.join(compiled[before:])}")
    print(f"{len(failed)} failed" if failed else "all compiled for sm_90")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
