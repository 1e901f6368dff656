"""GPTQ (Frantar et al., 2022): quantize a Linear's weight column by column, spreading each
column's rounding error over the columns not yet quantized through the inverse Hessian of the
layer's reconstruction loss ||WX - QX||^2, whose Hessian is H = 2 X X^T over calibration inputs.
"""

from __future__ import annotations

import torch

from kiln.model.quantized import IntWeight
from kiln.quant.rtn import grid, to_int


class Hessian:
    """Running H = 2/n * sum x x^T [in, in] over the inputs a Linear sees."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.h = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulate inputs x [..., in]."""
        x = x.reshape(-1, x.shape[-1]).double()
        m = x.shape[0]
        self.h *= self.n / (self.n + m)
        self.n += m
        x = x * (2 / self.n) ** 0.5
        self.h += x.t() @ x


def quantize_gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    act_order: bool = False,
    percdamp: float = 0.01,
    blocksize: int = 128,
) -> IntWeight:
    """Quantize w [out, in] given the Hessian h [in, in] of its inputs."""
    w = w.detach().double().clone()
    h = h.double().clone()
    out_features, n = w.shape
    size = n if group_size == -1 else group_size
    dead = torch.diag(h) == 0  # inputs that are always zero: their weights do not matter
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.arange(n, device=w.device)
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
    w, h = w[:, perm], h[perm][:, perm]
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(n, dtype=h.dtype, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    q = torch.zeros(out_features, n, dtype=torch.int32, device=w.device)
    scales, zeros = [], []
    blocksize = max(blocksize // size, 1) * size if size < blocksize else blocksize
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if (i1 + i) % size == 0:  # a new group: its grid from the weights as updated so far
                cols = w1[:, i : i + size] if size <= blocksize else w[:, i1 + i : i1 + i + size]
                scale, zero = grid(cols, bits, sym)
                scales.append(scale)
                zeros.append(zero)
            col = w1[:, i]
            qi = to_int(col[:, None], scale, zero, bits)[:, 0]
            q[:, i1 + i] = qi
            deq = (qi - zero).double() * scale.double()
            e = (col - deq) / hinv1[i, i]
            w1[:, i:] -= e[:, None] @ hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    invperm = torch.argsort(perm)
    g_idx = (invperm // size).to(torch.int32)  # input k sat at position invperm[k]
    return IntWeight(
        q[:, invperm].t().contiguous(),
        torch.stack(scales).half(),
        torch.stack(zeros),
        g_idx,
        bits,
    )
