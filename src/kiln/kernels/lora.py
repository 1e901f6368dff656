"""Multi-LoRA shrink / expand (Punica's BGMV/SGMV, per token): many adapters in one batch.

Every token carries the slot of its adapter (-1: none). The adapters' weights sit stacked by
slot, padded to one rank R (scaling folded into B). A fused q/k/v or gate/up Linear stacks its
projections' A along the rank and their B along the output, slice i owning y's columns
[i R, (i+1) R) and the output columns cols_i:

    shrink: y[n]             = x[n] @ A[slot[n]].T                    A: [S, slices * R, K]
    expand: out[n, cols_i]  += y[n, iR:(i+1)R] @ B[slot[n], cols_i].T  B: [S, O, R]

(rows of slot -1 untouched): one shrink and one expand launch a Linear, whatever its slices.

The Triton kernels take a tile of tokens and loop over the slots in it (the runner orders the
tokens by adapter, so a tile mostly holds one): each adapter's weights are read once per tile.
A decode step has few tiles, so the shrink also splits K over programs (split-K) and writes
float32 partial sums [P, N, slices * R]; the expand adds the P partials up as it reads them (no
atomics, no zeroing launch, the same sums every run). Shapes and the slot buffer stay fixed,
and nothing is read back to the host, so CUDA graphs capture them.
"""

from __future__ import annotations

import torch

from kiln.kernels._triton import num_sms, tl, triton, use_triton
from kiln.kernels.common import dot_options


def lora_shrink_ref(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Plain torch: [N, K] x [S, R, K] by slot [N] -> [1, N, R] float32 (zero for -1)."""
    y = torch.zeros(1, x.shape[0], a.shape[1], dtype=torch.float32, device=x.device)
    slots = slots[: x.shape[0]]
    for s in slots.unique().tolist():  # (reads the slots on the host: not capturable)
        if s >= 0:
            rows = slots == s
            y[0, rows] = x[rows].float() @ a[s].float().T
    return y


def lora_expand_ref(
    y: torch.Tensor,
    b: torch.Tensor,
    slots: torch.Tensor,
    out: torch.Tensor,
    sizes: list[int] | None = None,
) -> None:
    """Plain torch, in place: out[n, cols_i] += (sum over p of y[p, n, iR:(i+1)R]) @
    B[slot[n], cols_i].T where slot >= 0, for slice i of `sizes` (B's rows in order; default
    one slice): y [P, N, slices * R] float32, B [S, O, R], out [N, O]."""
    r = b.shape[2]
    y = y.sum(0)  # [N, slices * R]
    slots = slots[: y.shape[0]]
    lo = 0
    for i, size in enumerate(sizes or [b.shape[1]]):
        cols = slice(lo, lo + size)
        for s in slots.unique().tolist():
            if s >= 0:
                rows = (slots == s).nonzero()[:, 0]
                ys = y[rows, i * r : (i + 1) * r].to(b.dtype).float()  # (the kernel's rounding)
                delta = ys @ b[s, cols].float().T
                out[rows, cols] = (out[rows, cols].float() + delta).to(out.dtype)
        lo += size


@triton.jit
def _slot_range(slot_ptr, rows, mask):
    """The tile's slots and the lowest and highest adapter slot in it (lo > hi: none)."""
    slots = tl.load(slot_ptr + rows, mask=mask, other=-1)
    lo = tl.min(tl.where(slots >= 0, slots, 1 << 30), axis=0)
    hi = tl.max(slots, axis=0)
    return slots, lo, hi


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, slot_ptr, y_ptr, N, K, R, K_SPLIT,
    stride_x, stride_as, stride_ar, stride_yp, stride_y,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    """Program (m, p): the partial sums over K[p * K_SPLIT, (p + 1) * K_SPLIT) of tile m."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    row_ok = rows < N
    slots, lo, hi = _slot_range(slot_ptr, rows, row_ok)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for s in range(lo, hi + 1):
        sel = slots == s
        if tl.max(sel.to(tl.int32), axis=0) > 0:
            for k0 in range(split * K_SPLIT, (split + 1) * K_SPLIT, BLOCK_K):
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
    y_ptrs = y_ptr + split * stride_yp + rows[:, None].to(tl.int64) * stride_y + rr[None, :]
    tl.store(y_ptrs, acc, mask=row_ok[:, None] & (rr[None, :] < R))


@triton.jit
def _expand_kernel(
    y_ptr, b_ptr, slot_ptr, out_ptr, N, R, P, END0, END1, END2,
    stride_yp, stride_y, stride_bs, stride_bo, stride_out,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    """Program (m, o, i): tile m's output columns o of slice i, [END_{i-1}, END_i)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    i = tl.program_id(2)
    start = (i >= 1).to(tl.int32) * END0 + (i >= 2).to(tl.int32) * (END1 - END0)
    end = END0 + (i >= 1).to(tl.int32) * (END1 - END0) + (i >= 2).to(tl.int32) * (END2 - END1)
    first = start + tl.program_id(1) * BLOCK_O
    cols = first + tl.arange(0, BLOCK_O)
    row_ok, col_ok = rows < N, cols < end
    slots, lo, hi = _slot_range(slot_ptr, rows, row_ok)
    if (lo <= hi) & (first < end):
        rr = tl.arange(0, BLOCK_R)
        y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_y + i * R + rr[None, :]
        y_mask = row_ok[:, None] & (rr[None, :] < R)
        y = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for p in range(P):  # the shrink's split-K partial sums
            y += tl.load(y_ptrs + p * stride_yp, mask=y_mask, other=0.0)
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


BLOCK_M = 16  # tokens a shrink tile
MAX_SPLITS = 16  # split-K programs a tile at most (the expand reads that many partials)


def _expand_block_m(n: int) -> int:
    """Tokens an expand tile: 16 for decode-sized steps, 64 for long prefills (each program
    reads its slots' B and the partial sums once for more rows)."""
    return 16 if n < 1024 else 64


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def shrink_splits(n: int, k: int, block_k: int, device: torch.device) -> tuple[int, int]:
    """(K_SPLIT, P): each of P programs a tile sums K_SPLIT of the K columns (a multiple of
    block_k), enough of them for about one program an SM."""
    chunks = triton.cdiv(k, block_k)
    want = min(MAX_SPLITS, max(1, num_sms(device) // triton.cdiv(n, BLOCK_M)))
    per = triton.cdiv(chunks, want)
    return per * block_k, triton.cdiv(chunks, per)


def lora_shrink_triton(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Triton lora_shrink: [N, K] x [S, R, K] -> [P, N, R] float32 split-K partial sums (their
    sum over P is lora_shrink_ref's)."""
    n, k = x.shape
    r = a.shape[1]
    assert x.stride(1) == 1 and a.stride(2) == 1 and slots.shape[0] >= n
    block_k = min(128, max(16, triton.next_power_of_2(k)))
    k_split, p = shrink_splits(n, k, block_k, x.device)
    y = torch.empty(p, n, r, dtype=torch.float32, device=x.device)
    _shrink_kernel[(triton.cdiv(n, BLOCK_M), p)](
        x, a, slots, y, n, k, r, k_split,
        x.stride(0), a.stride(0), a.stride(1), y.stride(0), y.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_R=_block_r(r), BLOCK_K=block_k, **dot_options(x),
    )  # fmt: skip
    return y


def lora_expand_triton(
    y: torch.Tensor,
    b: torch.Tensor,
    slots: torch.Tensor,
    out: torch.Tensor,
    sizes: list[int] | None = None,
) -> None:
    """Triton lora_expand (every slice in one launch); same contract as lora_expand_ref."""
    p, n, _ = y.shape
    r, o = b.shape[2], b.shape[1]
    sizes = sizes or [o]
    assert len(sizes) <= 3 and sum(sizes) == o and out.shape[1] == o, (sizes, o, out.shape)
    assert y.stride(2) == 1 and b.stride(2) == 1 and out.stride(1) == 1
    ends = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    ends += [o] * (3 - len(ends))
    block_o = min(64, max(16, triton.next_power_of_2(max(sizes))))
    block_m = _expand_block_m(n)
    grid = (triton.cdiv(n, block_m), triton.cdiv(max(sizes), block_o), len(sizes))
    _expand_kernel[grid](
        y, b, slots, out, n, r, p, *ends,
        y.stride(0), y.stride(1), b.stride(0), b.stride(1), out.stride(0),
        BLOCK_M=block_m, BLOCK_R=_block_r(r), BLOCK_O=block_o, **dot_options(b),
    )  # fmt: skip


def lora_shrink(x, a, slots):
    """Triton on CUDA, torch elsewhere."""
    return lora_shrink_triton(x, a, slots) if use_triton(x) else lora_shrink_ref(x, a, slots)


def lora_expand(y, b, slots, out, sizes=None):
    """Triton on CUDA, torch elsewhere."""
    fn = lora_expand_triton if use_triton(y) else lora_expand_ref
    fn(y, b, slots, out, sizes)
