"""Multi-LoRA shrink / expand: the Triton kernels against the torch references."""

import pytest
import torch

from kiln.kernels.lora import (
    lora_expand_ref,
    lora_expand_triton,
    lora_shrink_ref,
    lora_shrink_triton,
)


def _case(n, k, r, o, num_slots, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    a = torch.randn(num_slots, r, k, generator=g) / k**0.5
    b = torch.randn(num_slots, o, r, generator=g)
    slots = torch.randint(-1, num_slots, (n,), generator=g).to(torch.int32)
    return x.to(device, dtype), a.to(device, dtype), b.to(device, dtype), slots.to(device)


@pytest.mark.parametrize("n,k,r,o", [(1, 32, 8, 48), (37, 80, 16, 96), (20, 64, 5, 24)])
def test_shrink_matches_reference(n, k, r, o, dtype, device, check):
    x, a, _, slots = _case(n, k, r, o, 3, dtype, device)
    check(lora_shrink_triton(x, a, slots), lora_shrink_ref(x, a, slots))


def test_shrink_gives_zero_for_tokens_without_adapter(device, check):
    x, a, _, _ = _case(18, 32, 8, 16, 2, torch.float32, device)
    slots = torch.full((18,), -1, dtype=torch.int32, device=device)
    slots[3] = 1
    y = lora_shrink_triton(x, a, slots)
    assert y[slots < 0].abs().max() == 0
    check(y[3], x[3] @ a[1].T)


@pytest.mark.parametrize("n,r,o,offset", [(1, 8, 48, 0), (37, 16, 96, 16), (20, 5, 24, 7)])
def test_expand_matches_reference_and_leaves_other_rows(n, r, o, offset, dtype, device, check):
    _, _, b, slots = _case(n, 32, r, o, 3, dtype, device, seed=1)
    y = torch.randn(n, r, device=device).to(dtype)
    out = torch.randn(n, o + offset + 5, device=device).to(dtype)
    want, got = out.clone(), out.clone()
    lora_expand_ref(y, b, slots, want, offset)
    lora_expand_triton(y, b, slots, got, offset)
    check(got, want)
    keep = slots < 0
    assert torch.equal(got[keep], out[keep])
    assert torch.equal(got[:, :offset], out[:, :offset])
    assert torch.equal(got[:, offset + o :], out[:, offset + o :])


def test_expand_of_a_strided_slice(device, check):
    """A fused projection's shrink output holds each slice's rank side by side."""
    _, _, b, slots = _case(17, 32, 8, 40, 2, torch.float32, device, seed=2)
    y = torch.randn(17, 3 * 8, device=device)[:, 8:16]
    out = torch.zeros(17, 40, device=device)
    want = out.clone()
    lora_expand_ref(y, b, slots, want)
    lora_expand_triton(y, b, slots, out)
    check(out, want)
