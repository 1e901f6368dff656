"""SwiGLU's activation: silu(gate) * up, gate and up side by side in one [N, 2I] tensor."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.kernels._triton import tl, triton, use_triton


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Plain torch: [..., 2I] -> [..., I] = silu(x[..., :I]) * x[..., I:]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, stride_x, stride_out, I, BLOCK: tl.constexpr
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + I + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # Round silu(gate) to the input dtype before the product, as the torch reference does.
    act = (g * tl.sigmoid(g)).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (act * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """Triton silu_and_mul; same contract as silu_and_mul_ref."""
    two_i = x.shape[-1]
    assert two_i % 2 == 0, f"last dim must be even, got {two_i}"
    x2 = x.reshape(-1, two_i)  # [N, 2I]
    assert x2.stride(-1) == 1
    inter = two_i // 2
    out = torch.empty(*x.shape[:-1], inter, dtype=x.dtype, device=x.device)
    out2 = out.view(-1, inter)
    block = min(triton.next_power_of_2(inter), 1024)
    grid = (x2.shape[0], triton.cdiv(inter, block))
    _silu_and_mul_kernel[grid](x2, out2, x2.stride(0), out2.stride(0), inter, BLOCK=block)
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :I]) * x[..., I:]: Triton on CUDA, torch elsewhere."""
    return silu_and_mul_triton(x) if use_triton(x) else silu_and_mul_ref(x)
