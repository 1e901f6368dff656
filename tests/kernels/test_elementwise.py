"""RMSNorm, RoPE and SiLU-and-mul kernels against their torch references."""

import pytest
import torch

from kiln.kernels.rmsnorm import rmsnorm_ref, rmsnorm_triton
from kiln.kernels.rope import rope_ref, rope_triton
from kiln.kernels.silu_and_mul import silu_and_mul_ref, silu_and_mul_triton
from kiln.model.layers import RMSNorm


def _cos_sin(max_pos: int, head_dim: int, device) -> torch.Tensor:
    freqs = torch.outer(torch.arange(max_pos).float(), torch.rand(head_dim // 2))
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)  # [max_pos, head_dim]


@pytest.mark.parametrize("rows,hidden", [(1, 48), (7, 96)])
def test_rmsnorm_matches_reference(dtype, device, check, poisoned, rows, hidden):
    x = torch.randn(rows, hidden, dtype=dtype, device=device)
    weight = torch.randn(hidden, dtype=dtype, device=device)
    check(poisoned(rmsnorm_triton, x, weight, 1e-6), rmsnorm_ref(x, weight, 1e-6))


def test_rmsnorm_fused_residual_matches_reference(dtype, device, check, poisoned):
    x, residual = torch.randn(2, 5, 40, dtype=dtype, device=device).unbind(0)
    weight = torch.randn(40, dtype=dtype, device=device)
    out, new_residual = poisoned(rmsnorm_triton, x, weight, 1e-5, residual)
    ref_out, ref_residual = rmsnorm_ref(x, weight, 1e-5, residual)
    check(out, ref_out)
    check(new_residual, ref_residual)  # the interpreter rounds to bfloat16 differently


def test_rmsnorm_reference_is_the_model_layer():
    layer = RMSNorm(24, eps=1e-6).to(torch.bfloat16)
    torch.nn.init.normal_(layer.weight)
    x = torch.randn(3, 24, dtype=torch.bfloat16)
    assert torch.equal(rmsnorm_ref(x, layer.weight, 1e-6), layer(x))


@pytest.mark.parametrize("head_dim", [32, 64])
def test_rope_matches_reference(dtype, device, check, poisoned, head_dim):
    q = torch.randn(5, 4, head_dim, dtype=dtype, device=device)
    k = torch.randn(5, 2, head_dim, dtype=dtype, device=device)
    cos_sin = _cos_sin(64, head_dim, device)
    positions = torch.randint(0, 64, (5,), device=device)
    got = poisoned(rope_triton, q, k, positions, cos_sin)
    for a, b in zip(got, rope_ref(q, k, positions, cos_sin)):
        check(a, b)


@pytest.mark.parametrize("rows,inter", [(1, 40), (5, 160)])
def test_silu_and_mul_matches_reference(dtype, device, check, poisoned, rows, inter):
    x = torch.randn(rows, 2 * inter, dtype=dtype, device=device)
    check(poisoned(silu_and_mul_triton, x), silu_and_mul_ref(x))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_elementwise_kernels_at_qwen3_sizes(dtype, check, poisoned):
    n, hidden, inter = 4099, 1024, 3072
    x, residual = torch.randn(2, n, hidden, dtype=dtype, device="cuda").unbind(0)
    weight = torch.randn(hidden, dtype=dtype, device="cuda")
    got = poisoned(rmsnorm_triton, x, weight, 1e-6, residual)
    for a, b in zip(got, rmsnorm_ref(x, weight, 1e-6, residual)):
        check(a, b)
    gate_up = torch.randn(n, 2 * inter, dtype=dtype, device="cuda")
    check(poisoned(silu_and_mul_triton, gate_up), silu_and_mul_ref(gate_up))
    q = torch.randn(n, 16, 128, dtype=dtype, device="cuda")
    k = torch.randn(n, 8, 128, dtype=dtype, device="cuda")
    cos_sin = _cos_sin(40960, 128, "cuda")
    positions = torch.randint(0, 40960, (n,), device="cuda")
    got = poisoned(rope_triton, q, k, positions, cos_sin)
    for a, b in zip(got, rope_ref(q, k, positions, cos_sin)):
        check(a, b)
