"""Selective scan: the Triton chunked scan and decode step against the torch references."""

import pytest
import torch

from kiln.kernels.selective_scan import (
    selective_scan_ref,
    selective_scan_triton,
    selective_state_update_ref,
    selective_state_update_triton,
)


def _inputs(num_tokens, dim, nstate, groups, dtype, device, num_slots=5):
    def r(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    u, delta, z = r(num_tokens, dim), r(num_tokens, dim, scale=0.5), r(num_tokens, dim)
    B, C = r(num_tokens, groups, nstate), r(num_tokens, groups, nstate)
    A = -torch.rand(dim, nstate, device=device) - 0.1
    D, bias = torch.randn(dim, device=device), torch.randn(dim, device=device) * 0.3
    state = torch.randn(num_slots, dim, nstate, device=device)
    return u, delta, A, B, C, D, z, bias, state


@pytest.mark.parametrize(
    "dtype,lens,dim,nstate,groups,gated",
    [
        (torch.float32, [1, 19, 37, 3], 24, 8, 1, True),
        (torch.float32, [5, 20], 32, 16, 4, False),
        (torch.bfloat16, [7], 16, 16, 1, True),
    ],
)
def test_scan_matches_reference(device, check, dtype, lens, dim, nstate, groups, gated):
    u, delta, A, B, C, D, z, bias, state = _inputs(sum(lens), dim, nstate, groups, dtype, device)
    z = z if gated else None
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=device)
    idx = torch.tensor([4, 0, 2, 1][: len(lens)], device=device)
    has = torch.tensor([True, False, True, False][: len(lens)], device=device)
    ref_state, out_state = state.clone(), state.clone()
    args = (u, delta, A, B, C, D, z, bias, True)
    expected = selective_scan_ref(*args, ref_state, idx, has, cu)
    actual = selective_scan_triton(*args, out_state, idx, has, cu)
    check(actual, expected)
    torch.testing.assert_close(out_state, ref_state, rtol=1e-3, atol=1e-3)
    untouched = [s for s in range(state.shape[0]) if s not in idx.tolist()]
    assert torch.equal(out_state[untouched], state[untouched])


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_state_update_matches_reference(device, check, dtype, groups):
    u, delta, A, B, C, D, z, bias, state = _inputs(3, 32, 16, groups, dtype, device)
    idx = torch.tensor([3, 0, 4], device=device)
    ref_state, out_state = state.clone(), state.clone()
    expected = selective_state_update_ref(u, delta, A, B, C, D, z, bias, True, ref_state, idx)
    actual = selective_state_update_triton(u, delta, A, B, C, D, z, bias, True, out_state, idx)
    check(actual, expected)
    torch.testing.assert_close(out_state, ref_state, rtol=1e-3, atol=1e-3)


def test_scan_of_a_split_sequence_equals_the_whole(device, check):
    """Scanning a sequence in two pieces (chunked prefill) through the state gives the same."""
    u, delta, A, B, C, D, z, bias, state = _inputs(30, 16, 8, 1, torch.float32, device)
    args = lambda sl: (u[sl], delta[sl], A, B[sl], C[sl], D, z[sl], bias, True)  # noqa: E731
    idx, cu = torch.tensor([1], device=device), lambda n: torch.tensor([0, n], device=device)
    yes, no = torch.tensor([True], device=device), torch.tensor([False], device=device)
    whole = selective_scan_triton(*args(slice(None)), state.clone(), idx, no, cu(30))
    first = selective_scan_triton(*args(slice(0, 11)), state, idx, no, cu(11))
    second = selective_scan_triton(*args(slice(11, 30)), state, idx, yes, cu(19))
    check(torch.cat([first, second]), whole)
