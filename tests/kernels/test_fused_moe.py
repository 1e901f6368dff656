"""Fused MoE: the Triton grouped GEMMs against the per-expert loop, and the alignment."""

import pytest
import torch

from kiln.kernels.fused_moe import (
    align_block_size,
    fused_moe_ref,
    fused_moe_triton,
    get_config,
    load_configs,
    nearest_config,
)
from kiln.model.layers import route


def _moe(device, tokens, hidden, inter, experts, top_k, dtype, renormalize=True):
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, device=device) / hidden**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, device=device) / inter**0.5).to(dtype)
    logits = torch.randn(tokens, experts, device=device)
    weights, ids = route(logits, top_k, renormalize)
    return x, w13, w2, weights, ids


@pytest.mark.parametrize(
    "tokens,hidden,inter,experts,top_k",
    [(1, 32, 64, 4, 2), (7, 48, 40, 8, 2), (5, 64, 32, 3, 3)],
)
def test_fused_moe_matches_per_expert_loop(
    dtype, device, check, poisoned, tokens, hidden, inter, experts, top_k
):
    x, w13, w2, weights, ids = _moe(device, tokens, hidden, inter, experts, top_k, dtype)
    out = poisoned(fused_moe_triton, x, w13, w2, weights, ids)
    check(out, fused_moe_ref(x, w13, w2, weights, ids))


def test_fused_moe_unnormalized_weights_and_unused_experts(device, check):
    """Top-1 without renormalization (Switch): the weight is the router probability; experts
    no token chose are skipped."""
    x, w13, w2, weights, ids = _moe(device, 6, 32, 32, 8, 1, torch.float32, renormalize=False)
    ids[:] = torch.tensor([[5], [5], [0], [5], [0], [0]])
    assert (weights < 1).all()
    check(fused_moe_triton(x, w13, w2, weights, ids), fused_moe_ref(x, w13, w2, weights, ids))


def test_align_block_size_groups_pairs_by_expert(device):
    ids = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 3]], device=device)
    sorted_ids, expert_ids, num_padded = align_block_size(ids, num_experts=5, block_m=4)
    pairs = ids.numel()
    used = int(num_padded.item())
    assert used == 4 * 4  # experts 0..3 each fill one tile of 4, expert 4 none
    assert sorted_ids.numel() % 4 == 0 and sorted_ids.numel() >= pairs + 5 * 3
    flat = ids.flatten()
    for tile, e in enumerate(expert_ids[: used // 4].tolist()):
        rows = sorted_ids[tile * 4 : tile * 4 + 4]
        real = rows[rows < pairs]
        assert (flat[real.long()] == e).all()
    assert sorted(sorted_ids[sorted_ids < pairs].tolist()) == list(range(pairs))
    assert (sorted_ids[used:] == pairs).all() and (expert_ids[used // 4 :] == -1).all()


def test_default_config_file():
    table = load_configs("default.json")
    assert nearest_config(table, 300) == table[256] and nearest_config(table, 1) == table[1]
    for cfg in table.values():
        assert {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"} == set(cfg)
    assert get_config(300, 8, 64, 32, torch.float32, "cpu")["BLOCK_M"] == 16


@pytest.mark.gpu
@pytest.mark.parametrize(
    "experts,top_k,hidden,inter",
    [(8, 2, 4096, 14336), (128, 8, 2048, 768)],
    ids=["mixtral", "qwen3moe"],
)
@pytest.mark.parametrize("tokens", [1, 32, 512])
def test_fused_moe_at_model_sizes(check, experts, top_k, hidden, inter, tokens):
    """Mixtral-8x7B and Qwen3-30B-A3B layers in bfloat16, with the shipped launch configs."""
    x, w13, w2, weights, ids = _moe("cuda", tokens, hidden, inter, experts, top_k, torch.bfloat16)
    check(fused_moe_triton(x, w13, w2, weights, ids), fused_moe_ref(x, w13, w2, weights, ids))
