"""Weight-only quantized matmul (W4A16 / W8A16): the packed layout against IntWeight, the Triton
kernels against the dequantize-then-matmul reference."""

import pytest
import torch
from quant_weights import LLAMA3_8B, int_weight, packed_of

from kiln.kernels.quant_gemv import SPLIT_K_CHOICES
from kiln.kernels.quant_layout import dequantize_ref, pack
from kiln.kernels.quant_linear import (
    DEQUANT_MIN_M,
    dequantize_triton,
    pick_config,
    quant_matmul,
    quant_matmul_ref,
    quant_matmul_triton,
    sweep_configs,
)


@pytest.mark.parametrize("act_order", [False, True], ids=["ordered", "act_order"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize(
    "bits,group_size,k", [(4, 32, 96), (4, 128, 512), (4, -1, 72), (8, 64, 192), (8, -1, 40)]
)
def test_packed_layout_dequantizes_to_the_int_weight_exactly(bits, group_size, k, sym, act_order):
    if act_order and group_size == -1:
        pytest.skip("one group: nothing to order")
    w = int_weight(k, 24, bits, group_size, sym, act_order)
    p = packed_of(w, group_size)
    perm = p.perm if p.perm is not None else torch.arange(k)
    assert torch.equal(dequantize_ref(p), w.dequantize()[:, perm])
    assert (p.perm is not None) == act_order and (p.zeros is None) == sym
    assert p.qweight.dtype == torch.int32 and p.qweight.shape[0] == 24


def test_pack_refuses_groups_of_unequal_size():
    w = int_weight(64, 8, 4, 32, True, False)
    g_idx = w.g_idx.clone()
    g_idx[0] = 1  # group 1 now has 33 inputs
    with pytest.raises(ValueError, match="every group 32 inputs"):
        pack(w.q, w.scales, w.zeros, g_idx, 4, 32)


# (M, K, N): ragged N against the interpreter's 16-row tiles; M through all three kernels' sizes
@pytest.mark.parametrize("m", [1, 3, 21])
@pytest.mark.parametrize(
    "bits,group_size,sym,act_order,k,n",
    [
        (4, 32, False, False, 96, 40),
        (4, 128, True, False, 256, 24),
        (4, 64, False, True, 128, 40),
        (4, -1, True, False, 80, 33),
        (8, 32, False, True, 64, 24),
        (8, -1, True, False, 48, 17),
    ],
    ids=["g32-asym", "g128-sym", "g64-act", "channel", "int8-g32-act", "int8-channel"],
)
def test_quant_matmul_triton_matches_reference(
    bits, group_size, sym, act_order, k, n, m, dtype, device, check, poisoned
):
    w = int_weight(k, n, bits, group_size, sym, act_order, device)
    p = packed_of(w, group_size)
    x = torch.randn(m, k, device=device).to(dtype)
    bias = torch.randn(n, device=device).to(dtype) if m == 3 else None
    out = poisoned(quant_matmul_triton, x, p, bias)
    check(out, quant_matmul_ref(x, p, bias))
    # the reference is the dequantized IntWeight's Linear, on the original input order
    b32 = None if bias is None else bias.float()
    ref = torch.nn.functional.linear(x.float(), w.dequantize(), b32)
    assert (quant_matmul_ref(x.float(), p, b32) - ref).abs().max() < 1e-4 * ref.abs().max()


def test_quant_matmul_keeps_leading_dims(device):
    w = int_weight(64, 32, 4, 32, False, False, device)
    p = packed_of(w, 32)
    x = torch.randn(2, 3, 64, device=device)
    out = quant_matmul_triton(x, p)
    assert out.shape == (2, 3, 32)
    assert torch.allclose(out, quant_matmul_ref(x, p), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, False), (8, -1, True)])
def test_dequantize_triton_matches_reference(bits, group_size, sym, device):
    w = int_weight(96, 40, bits, group_size, sym, act_order=bits == 4, device=device)
    p = packed_of(w, group_size)
    assert torch.equal(dequantize_triton(p, torch.float32), dequantize_ref(p))


@pytest.mark.parametrize("m", [1, 3, 64])
def test_every_sweep_config_computes_the_same_product(m, device):
    """Each candidate tile of the GPU sweep (and the default) is a valid launch here too; the
    split-K GEMV's tiles each at one SPLIT_K, in turn (a runtime argument: no new code)."""
    w = int_weight(128, 32, 4, 64, False, False, device)
    p = packed_of(w, 64)
    x = torch.randn(m, 128, device=device)
    ref = quant_matmul_ref(x, p)
    configs = sweep_configs(m)
    split_k = [c for c in configs if "SPLIT_K" in c]  # tile by tile, n SPLIT_Ks a tile
    n = len(SPLIT_K_CHOICES)
    tried = [c for i, c in enumerate(split_k) if i % n == i // n % n]
    tried += [c for c in configs if "SPLIT_K" not in c]
    for config in [pick_config(m, p, True)] + tried:
        out = quant_matmul_triton(x, p, config=config)
        assert (out - ref).abs().max() < 1e-4 * ref.abs().max(), config


def test_dispatcher_runs_the_reference_on_cpu():
    w = int_weight(64, 16, 4, 32, True, False)
    p = packed_of(w, 32)
    x = torch.randn(2, 64)
    assert torch.equal(quant_matmul(x, p), quant_matmul_ref(x, p))


@pytest.mark.gpu
@pytest.mark.parametrize("bits,group_size", [(4, 128), (4, 32), (8, -1)])
@pytest.mark.parametrize("k,n", LLAMA3_8B)
def test_quant_matmul_real_sizes_on_gpu(k, n, bits, group_size):
    w = int_weight(k, n, bits, group_size, sym=False, act_order=False, device="cuda")
    p = packed_of(w, group_size)
    for m in (1, 2, 16, 64, 256, DEQUANT_MIN_M):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        out, ref = quant_matmul_triton(x, p), quant_matmul_ref(x, p)
        err = (out.float() - ref.float()).abs().max() / ref.float().abs().max()
        assert err < 2e-2, (m, err.item())
