"""The split-K decode GEMV (kiln.kernels.quant_gemv) against quant_matmul_ref: slices that cut
groups unevenly or run past K, every row count it takes (1..4), act-order, asymmetric zeros,
8 bits, bias; the same bits run to run; the default SPLIT_K and tiles."""

import pytest
import torch
from quant_weights import LLAMA3_8B, int_weight, packed_of

from kiln.kernels import quant_gemv
from kiln.kernels.quant_gemv import (
    INTERPRETER_CONFIG,
    MAX_M,
    PROGRAMS_PER_SM,
    SPLIT_K_CHOICES,
    default_config,
    default_split_k,
    sweep_configs,
)
from kiln.kernels.quant_layout import PackedWeight
from kiln.kernels.quant_linear import quant_matmul_ref, quant_matmul_triton


def gemv_config(split: int, block_n: int = 16, block_w: int = 16) -> dict:
    return dict(INTERPRETER_CONFIG, BLOCK_N=block_n, BLOCK_W=block_w, SPLIT_K=split)


# bits, group_size, sym, act_order, K, N; 16-word steps (INTERPRETER_CONFIG's BLOCK_W)
CASES = {
    "g128-sym": (4, 128, True, False, 384, 32),  # 3 groups of 16 words; N a tile multiple
    "g32-asym": (4, 32, False, False, 160, 40),  # 5 groups of 4 words (20: 2 steps); N ragged
    "g64-act-asym": (4, 64, False, True, 192, 24),
    "channel-odd": (4, -1, True, False, 72, 17),  # one 9-word group: 1-word vectors, K padded
    "int8-g32-asym": (8, 32, False, False, 96, 20),
    "int8-g64-act": (8, 64, True, True, 128, 16),
}


@pytest.mark.parametrize("m", range(1, MAX_M + 1))
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_split_k_gemv_matches_reference(case, m, device, check, poisoned):
    bits, group_size, sym, act_order, k, n = case
    w = int_weight(k, n, bits, group_size, sym, act_order, device)
    p = packed_of(w, group_size)
    x = torch.randn(m, k, device=device)
    bias = torch.randn(n, device=device) if m % 2 else None
    ref = quant_matmul_ref(x, p, bias)
    for split in (1, 3) if m % 2 else (2, 4):
        check(poisoned(quant_matmul_triton, x, p, bias, config=gemv_config(split)), ref)


@pytest.mark.parametrize("split", [2, 4, 5, 16])
def test_slices_that_cut_groups_unevenly(split, device, check):
    """48 words (3 groups of 16) in slices of 32 + 16, 16 x 3 + an empty one, ... and 8-word
    steps: slices end inside a group, and the groups' scales and zeros still apply."""
    w = int_weight(384, 24, 4, 128, False, False, device)
    p = packed_of(w, 128)
    x = torch.randn(1, 384, device=device)
    out = quant_matmul_triton(x, p, config=gemv_config(split, block_n=8, block_w=8))
    check(out, quant_matmul_ref(x, p))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs_match_reference(dtype, device, check):
    w = int_weight(256, 48, 4, 128, False, True, device)
    p = packed_of(w, 128)
    x = torch.randn(2, 256, device=device).to(dtype)
    bias = torch.randn(48, device=device).to(dtype)
    check(quant_matmul_triton(x, p, bias, config=gemv_config(4)), quant_matmul_ref(x, p, bias))


def test_split_k_is_deterministic(device):
    """The partial sums are added in slice order by one kernel: no atomics, the same bits."""
    w = int_weight(512, 40, 4, 64, False, True, device)
    p = packed_of(w, 64)
    x = torch.randn(3, 512, device=device).to(torch.bfloat16)
    bias = torch.randn(40, device=device).to(torch.bfloat16)
    config = gemv_config(5)
    first = quant_matmul_triton(x, p, bias, config=config)
    assert torch.equal(first, quant_matmul_triton(x, p, bias, config=config))


def fake_weight(k: int, n: int, bits: int, group_size: int) -> PackedWeight:
    """A PackedWeight of Llama-sized shape without its values (for the launch settings)."""
    chunk = min(k if group_size == -1 else group_size, 32 // bits * 32)
    kw = k * bits // 32
    return PackedWeight(
        torch.empty(n, kw, dtype=torch.int32), torch.empty(n, k // chunk), None, None, bits,
        chunk, k,
    )  # fmt: skip


@pytest.mark.parametrize("bits,group_size", [(4, 128), (8, -1)])
@pytest.mark.parametrize("k,n", LLAMA3_8B)
@pytest.mark.parametrize("m", [1, 2, 4])
def test_default_split_k_fills_the_gpu_with_slices_of_whole_steps(
    m, k, n, bits, group_size, monkeypatch
):
    """The guess for shapes not in TUNED (these are Llama-3-8B's, which TUNED has)."""
    monkeypatch.setattr(quant_gemv, "TUNED", {})
    w = fake_weight(k, n, bits, group_size)
    config = default_config(m, w, is_cuda=True, sms=132)
    split, block_w = config["SPLIT_K"], config["BLOCK_W"]
    programs = -(-n // config["BLOCK_N"]) * split
    kw = w.qweight.shape[1]
    slice_words = -(-kw // split)
    assert split in SPLIT_K_CHOICES
    assert slice_words >= block_w and slice_words >= 4 * w.words  # whole steps, 4+ chunks
    # the grid is full, or halving the slices again would make them too short
    assert programs >= PROGRAMS_PER_SM * 132 or kw < 4 * split * max(block_w, 4 * w.words)
    assert config["BLOCK_W"] == 128 * config["num_warps"]


def test_tuned_configs_are_taken_and_keep_the_layout_rule():
    """A measured shape takes its TUNED entry; every entry is a sweep candidate's kind of
    config (128 words a warp a step, a SPLIT_K the kernel takes)."""
    assert quant_gemv.TUNED, "bench_quant.py --part gemv's measured settings"
    for (bits, k, n, m), config in quant_gemv.TUNED.items():
        w = fake_weight(k, n, bits, 128 if bits == 4 else -1)
        assert default_config(m, w, is_cuda=True, sms=132) == config
        assert config["BLOCK_W"] == 128 * config["num_warps"]
        assert config["SPLIT_K"] in SPLIT_K_CHOICES and 1 <= m <= MAX_M


def test_default_split_k_by_shape():
    """One-warp programs of 8 rows (M = 1) on 132 SMs: narrow and long layers split."""
    assert default_split_k(tiles=768, kw=512, min_slice=128, sms=132) == 2  # qkv
    assert default_split_k(tiles=512, kw=512, min_slice=128, sms=132) == 4  # o: 1-step slices
    assert default_split_k(tiles=3584, kw=512, min_slice=128, sms=132) == 1  # gate_up
    assert default_split_k(tiles=512, kw=1792, min_slice=128, sms=132) == 4  # down
    assert default_split_k(tiles=4, kw=1 << 16, min_slice=128, sms=132) == 16  # at most 16


@pytest.mark.parametrize("m", [1, 2, 4])
def test_sweep_tiles_keep_a_warp_on_128_words(m):
    """Each candidate's x tile gives each thread 4 inputs (see sweep_configs), and every
    candidate tile comes with every SPLIT_K."""
    configs = sweep_configs(m)
    assert all(c["BLOCK_W"] == 128 * c["num_warps"] for c in configs)
    tiles = {tuple(v for key, v in c.items() if key != "SPLIT_K") for c in configs}
    assert len(configs) == len(tiles) * len(SPLIT_K_CHOICES)
