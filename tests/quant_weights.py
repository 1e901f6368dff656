"""Random quantized weights for the kernel tests: IntWeight's fields and their packed layout."""

from __future__ import annotations

import torch

from kiln.kernels.quant_layout import PackedWeight, pack
from kiln.model.quantized import IntWeight

# Llama-3-8B projections (K, N), fused as the engine runs them: qkv, o, gate_up, down.
LLAMA3_8B = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]


def int_weight(k, n, bits, group_size, sym, act_order, device="cpu", seed=0) -> IntWeight:
    """Random integers, fp16 scales and zeros; act-order: groups given to shuffled inputs."""
    gen = torch.Generator().manual_seed(seed)
    size = k if group_size == -1 else group_size
    groups = k // size
    q = torch.randint(0, 2**bits, (k, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.002).half()
    if sym:
        zeros = torch.full((groups, n), 2 ** (bits - 1), dtype=torch.int32)
    else:
        zeros = torch.randint(0, 2**bits, (groups, n), generator=gen, dtype=torch.int32)
    g_idx = torch.arange(k) // size
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    w = IntWeight(q, scales, zeros, g_idx.int(), bits)
    return IntWeight(*(t.to(device) for t in (w.q, w.scales, w.zeros, w.g_idx)), bits)


def packed_of(w: IntWeight, group_size: int) -> PackedWeight:
    return pack(w.q, w.scales, w.zeros, w.g_idx, w.bits, group_size)
