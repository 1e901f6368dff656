"""Multi-LoRA shrink / expand (Punica's BGMV/SGMV, per token): many adapters in one batch.

Every token carries the slot of its adapter (-1: none). The adapters' weights sit stacked by
slot, padded to one rank R (scaling folded into B):

    shrink: y[n]        = x[n] @ A[slot[n]].T         A: [S, R, K]   y: [N, R]
    expand: out[n, o:]  += y[n] @ B[slot[n]].T        B: [S, O, R]   (rows of slot -1 untouched)

The Triton kernels take a tile of tokens and loop over the slots in it (the runner orders the
tokens by adapter, so a tile mostly holds one): each adapter's weights are read once per tile.
Shapes and the slot buffer stay fixed, and nothing is read back to the host, so CUDA graphs
capture them. `o` lets a fused q/k/v or gate/up output take each projection's slice.
"""

from __future__ import annotations

import torch

from kiln.kernels._triton import tl, triton, use_triton
from kiln.kernels.common import dot_options


def lora_shrink_ref(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Plain torch: [N, K] x [S, R, K] by slot [N] -> [N, R] in x's dtype (zero for -1)."""
    y = torch.zeros(x.shape[0], a.shape[1], dtype=torch.float32, device=x.device)
    for s in slots.unique().tolist():  # (reads the slots on the host: not capturable)
        if s >= 0:
            rows = slots == s
            y[rows] = x[rows].float() @ a[s].float().T
    return y.to(x.dtype)


def lora_expand_ref(
    y: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, out: torch.Tensor, offset: int = 0
) -> None:
    """Plain torch, in place: out[n, offset:offset+O] += y[n] @ B[slot[n]].T (slot >= 0)."""
    cols = slice(offset, offset + b.shape[1])
    for s in slots.unique().tolist():
        if s >= 0:
            rows = (slots == s).nonzero()[:, 0]
            delta = y[rows].float() @ b[s].float().T
            out[rows, cols] = (out[rows, cols].float() + delta).to(out.dtype)


@triton.jit
def _slot_range(slot_ptr, rows, mask):
    """The tile's slots and the lowest and highest adapter slot in it (lo > hi: none)."""
    slots = tl.load(slot_ptr + rows, mask=mask, other=-1)
    lo = tl.min(tl.where(slots >= 0, slots, 1 << 30), axis=0)
    hi = tl.max(slots, axis=0)
    return slots, lo, hi


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, slot_ptr, y_ptr, N, K, R,
    stride_x, stride_as, stride_ar, stride_y,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    slots, lo, hi = _slot_range(slot_ptr, rows, row_ok)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for s in range(lo, hi + 1):
        sel = slots == s
        if tl.max(sel.to(tl.int32), axis=0) > 0:
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                k_ok = rk < K
                x = tl.load(
                    x_ptr + rows[:, None].to(tl.int64) * stride_x + rk[None, :],
                    mask=sel[:, None] & k_ok[None, :], other=0.0,
                )  # fmt: skip
                a = tl.load(
                    a_ptr + s * stride_as + rr[None, :] * stride_ar + rk[:, None],
                    mask=(rr[None, :] < R) & k_ok[:, None],
                    other=0.0,
                )  # [BLOCK_K, BLOCK_R]  fmt: skip
                a = a.to(x.dtype)
                if DOT_UPCAST:
                    x, a = x.to(tl.float32), a.to(tl.float32)
                acc += tl.dot(x, a, input_precision=DOT_PRECISION)
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_y + rr[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & (rr[None, :] < R))


@triton.jit
def _expand_kernel(
    y_ptr, b_ptr, slot_ptr, out_ptr, N, R, O,
    stride_y, stride_bs, stride_bo, stride_out,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    row_ok, col_ok = rows < N, cols < O
    slots, lo, hi = _slot_range(slot_ptr, rows, row_ok)
    if lo <= hi:
        rr = tl.arange(0, BLOCK_R)
        y = tl.load(
            y_ptr + rows[:, None].to(tl.int64) * stride_y + rr[None, :],
            mask=row_ok[:, None] & (rr[None, :] < R), other=0.0,
        )  # fmt: skip
        acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
        for s in range(lo, hi + 1):
            sel = slots == s
            if tl.max(sel.to(tl.int32), axis=0) > 0:
                b = tl.load(
                    b_ptr + s * stride_bs + cols[None, :] * stride_bo + rr[:, None],
                    mask=(rr[:, None] < R) & col_ok[None, :],
                    other=0.0,
                )  # [BLOCK_R, BLOCK_O]  fmt: skip
                ys = tl.where(sel[:, None], y, 0.0).to(b.dtype)
                if DOT_UPCAST:
                    ys, b = ys.to(tl.float32), b.to(tl.float32)
                acc += tl.dot(ys, b, input_precision=DOT_PRECISION)
        out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :]
        mask = (row_ok & (slots >= 0))[:, None] & col_ok[None, :]
        old = tl.load(out_ptrs, mask=mask, other=0.0)
        tl.store(out_ptrs, (old.to(tl.float32) + acc).to(old.dtype), mask=mask)


BLOCK_M = 16


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def lora_shrink_triton(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Triton lora_shrink; same contract as lora_shrink_ref."""
    n, k = x.shape
    r = a.shape[1]
    assert x.stride(1) == 1 and a.stride(2) == 1 and slots.shape[0] >= n
    y = torch.empty(n, r, dtype=x.dtype, device=x.device)
    block_k = min(128, max(16, triton.next_power_of_2(k)))
    _shrink_kernel[(triton.cdiv(n, BLOCK_M),)](
        x, a, slots, y, n, k, r, x.stride(0), a.stride(0), a.stride(1), y.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_R=_block_r(r), BLOCK_K=block_k, **dot_options(x),
    )  # fmt: skip
    return y


def lora_expand_triton(
    y: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, out: torch.Tensor, offset: int = 0
) -> None:
    """Triton lora_expand; same contract as lora_expand_ref."""
    n, r = y.shape
    o = b.shape[1]
    assert y.stride(1) == 1 and b.stride(2) == 1 and out.stride(1) == 1
    dst = out[:, offset : offset + o]
    block_o = min(64, max(16, triton.next_power_of_2(o)))
    grid = (triton.cdiv(n, BLOCK_M), triton.cdiv(o, block_o))
    _expand_kernel[grid](
        y, b, slots, dst, n, r, o, y.stride(0), b.stride(0), b.stride(1), out.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_R=_block_r(r), BLOCK_O=block_o, **dot_options(y),
    )  # fmt: skip


def lora_shrink(x, a, slots):
    """Triton on CUDA, torch elsewhere."""
    return lora_shrink_triton(x, a, slots) if use_triton(x) else lora_shrink_ref(x, a, slots)


def lora_expand(y, b, slots, out, offset=0):
    """Triton on CUDA, torch elsewhere."""
    fn = lora_expand_triton if use_triton(y) else lora_expand_ref
    fn(y, b, slots, out, offset)
