"""Calibration statistics of a Linear's inputs, each fed by kiln.quant.quantize.calibrate_blocks
(an object with add(x [..., in]) and n, the tokens seen), as GPTQ's and SparseGPT's Hessian
(kiln.quant.gptq.Hessian) is."""

from __future__ import annotations

import torch


class InputNorms:
    """Running sum of squares of each input feature [in] over the inputs a Linear sees."""

    def __init__(self, in_features: int, device):
        self.sq = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        self.sq += x.double().pow(2).sum(0)
        self.n += x.shape[0]


class HeadGram:
    """Per-head Gram matrix sum_t a_t,h a_t,h^T [heads, D, D] of o_proj's inputs."""

    def __init__(self, num_heads: int, head_dim: int, device):
        self.s = torch.zeros(num_heads, head_dim, head_dim, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        a = x.reshape(-1, *self.s.shape[:2]).double()  # [tokens, heads, D]
        self.s += torch.einsum("thd,the->hde", a, a)
        self.n += a.shape[0]
