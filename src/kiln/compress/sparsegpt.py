"""SparseGPT (Frantar & Alistarh, 2023): prune a Linear's weight column by column and, as
Optimal Brain Surgeon does, move each pruned weight's loss onto the columns not yet visited
through the inverse Hessian of the layer's reconstruction loss ||WX - W'X||^2 (H = 2 X X^T, the
same statistic GPTQ gathers: kiln.quant.gptq.Hessian).

    Hinv = chol(inverse(H + damp I)), upper        # the rows OBS needs, one Cholesky
    for each block of `blocksize` columns (lazy batch: later columns updated once a block):
        mask = the weights with the lowest w^2 / Hinv[j, j]^2      # the OBS saliency
        for each column j: error = (w_j - pruned w_j) / Hinv[j, j]
                           w[:, j+1:] -= error Hinv[j, j+1:]
    Unstructured, a block picks its `sparsity` share of weights at once (adaptive mask
    selection); N:M picks, every M columns, the M - N lowest of each row in that group.
"""

from __future__ import annotations

import torch


def obs_inverse(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """The upper Cholesky factor of (H + damp I)^-1, damp = percdamp * mean diag(H) [in, in]."""
    damp = percdamp * torch.diag(h).mean()
    h = h + damp * torch.eye(len(h), dtype=h.dtype, device=h.device)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True)


def lowest(score: torch.Tensor, count: int) -> torch.Tensor:
    """A bool mask of the `count` lowest entries of score (over all its entries)."""
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if count:
        mask[torch.topk(score.flatten(), count, largest=False).indices] = True
    return mask.view_as(score)


@torch.no_grad()
def sparsegpt(
    w: torch.Tensor,
    h: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> torch.Tensor:
    """w [out, in] pruned to `sparsity` (or to N nonzeros in every M inputs, nm=(N, M)) given
    the Hessian h [in, in] of its inputs, the surviving weights updated; in w's dtype."""
    dtype = w.dtype
    w = w.detach().double().clone()
    h = h.double().clone()
    out_features, n = w.shape
    dead = torch.diag(h) == 0  # inputs that are always zero: their weights do not matter
    h[dead, dead] = 1
    w[:, dead] = 0
    hinv = obs_inverse(h, percdamp)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)
        err1 = torch.zeros_like(w1)
        if nm is None:
            mask1 = lowest(w1**2 / d**2, int(w1.numel() * sparsity))
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                group = w1[:, i : i + nm[1]] ** 2 / d[i : i + nm[1]] ** 2  # [out, M]
                drop = torch.topk(group, nm[1] - nm[0], dim=1, largest=False).indices
                mask1[:, i : i + nm[1]].scatter_(1, drop, True)
            q = torch.where(mask1[:, i], 0.0, w1[:, i])
            err = (w1[:, i] - q) / d[i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None]
            w1[:, i] = q  # exactly zero where pruned
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w.to(dtype)
