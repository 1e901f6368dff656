"""RMSNorm, optionally fused with the residual add that precedes it.

Numerics follow kiln.model.layers.RMSNorm: normalize in float32, cast to x's dtype, THEN
multiply by the weight. The fused form first rounds x + residual to x's dtype, as the model's
`h = h + attn_out` does, and normalizes that.
"""

from __future__ import annotations

import torch

from kiln.kernels._triton import tl, triton, use_triton


def rmsnorm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch RMSNorm over the last dim; with `residual`, returns (norm(x + r), x + r)."""
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, x)


@triton.jit
def _rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr,
    stride_x, stride_res, stride_out, stride_new_res,
    H, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(new_res_ptr + row * stride_new_res + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / H + eps)
    h = (h * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (h * w).to(out_ptr.dtype.element_ty), mask=mask)


def rmsnorm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton RMSNorm over the last dim, one program a row; same contract as rmsnorm_ref."""
    shape, hidden = x.shape, x.shape[-1]
    x2 = x.reshape(-1, hidden)  # [N, H]
    assert x2.stride(-1) == 1 and weight.is_contiguous()
    out = torch.empty(shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    out2 = out.view(-1, hidden)
    if residual is not None:
        assert residual.shape == shape and residual.dtype == x.dtype
        res2 = residual.reshape(-1, hidden)
        assert res2.stride(-1) == 1
        new_res = torch.empty_like(x)
        new_res2 = new_res.view(-1, hidden)
    else:
        res2 = new_res2 = x2
    block = triton.next_power_of_2(hidden)
    _rmsnorm_kernel[(x2.shape[0],)](
        x2, res2, weight, out2, new_res2,
        x2.stride(0), res2.stride(0), out2.stride(0), new_res2.stride(0),
        hidden, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_H=block,
        num_warps=min(max(block // 256, 1), 16),
    )  # fmt: skip
    return out if residual is None else (out, new_res)


def rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm (fused with the residual add when `residual` is given): Triton on CUDA."""
    fn = rmsnorm_triton if use_triton(x) else rmsnorm_ref
    return fn(x, weight, eps, residual)
