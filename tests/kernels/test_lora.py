"""Multi-LoRA shrink / expand: the Triton kernels against the torch references."""

import pytest
import torch

from kiln.kernels.lora import (
    lora_expand_ref,
    lora_expand_triton,
    lora_shrink_ref,
    lora_shrink_triton,
    shrink_splits,
)


def _case(n, k, r, o, num_slots, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    a = torch.randn(num_slots, r, k, generator=g) / k**0.5
    b = torch.randn(num_slots, o, r, generator=g)
    slots = torch.randint(-1, num_slots, (n,), generator=g).to(torch.int32)
    return x.to(device, dtype), a.to(device, dtype), b.to(device, dtype), slots.to(device)


@pytest.mark.parametrize(
    "n,k,r", [(1, 32, 8), (37, 80, 16), (20, 64, 5), (6, 520, 48), (1100, 40, 8)]
)
def test_shrink_matches_reference(n, k, r, dtype, device, check):
    x, a, _, slots = _case(n, k, r, 8, 3, dtype, device)
    check(lora_shrink_triton(x, a, slots).sum(0), lora_shrink_ref(x, a, slots)[0])


def test_small_batches_split_k_over_programs(device):
    """A decode-sized step spreads K over several programs (their partials summed later); a
    long prefill has tiles enough and sums K in one."""
    k_split, p = shrink_splits(8, 1024, 128, torch.device(device))
    assert p > 1 and k_split * p >= 1024 and k_split * (p - 1) < 1024
    assert shrink_splits(8192, 1024, 128, torch.device(device)) == (1024, 1)


def test_shrink_gives_zero_for_tokens_without_adapter(device, check):
    x, a, _, _ = _case(18, 300, 8, 16, 2, torch.float32, device)
    slots = torch.full((18,), -1, dtype=torch.int32, device=device)
    slots[3] = 1
    y = lora_shrink_triton(x, a, slots).sum(0)
    assert y[slots < 0].abs().max() == 0
    check(y[3], x[3] @ a[1].T)


@pytest.mark.parametrize(
    "n,r,sizes", [(1, 8, [48]), (37, 16, [96, 32, 32]), (20, 5, [24, 40]), (1100, 8, [24])]
)
def test_expand_matches_reference_and_leaves_other_rows(n, r, sizes, dtype, device, check):
    """Each slice i adds y's rank columns i*R.. times its rows of B; P partials are summed."""
    o = sum(sizes)
    _, _, b, slots = _case(n, 32, r, o, 3, dtype, device, seed=1)
    y = torch.randn(2, n, len(sizes) * r, device=device)  # two split-K partials
    out = torch.randn(n, o, device=device).to(dtype)
    want, got = out.clone(), out.clone()
    lora_expand_ref(y, b, slots, want, sizes)
    lora_expand_triton(y, b, slots, got, sizes)
    check(got, want)
    keep = slots < 0
    assert torch.equal(got[keep], out[keep])


def test_expand_into_a_column_slice(device, check):
    """out may be a view of a wider row (the columns outside it stay as they were)."""
    _, _, b, slots = _case(17, 32, 8, 40, 2, torch.float32, device, seed=2)
    y = torch.randn(1, 17, 8, device=device)
    out = torch.randn(17, 50, device=device)
    want, got = out.clone(), out.clone()
    lora_expand_ref(y, b, slots, want[:, 7:47])
    lora_expand_triton(y, b, slots, got[:, 7:47])
    check(got, want)
    assert torch.equal(got[:, :7], out[:, :7]) and torch.equal(got[:, 47:], out[:, 47:])


def test_shrink_then_expand_is_the_per_token_lora_update(device, check):
    """The two launches of a fused q/k/v Linear against x @ A_i.T @ B_i.T, slice by slice."""
    n, k, r, sizes = 24, 200, 4, [32, 16, 16]
    x, a, b, slots = _case(n, k, 3 * r, sum(sizes), 2, torch.float32, device, seed=3)
    b = b[:, :, :r].contiguous()
    out = torch.zeros(n, sum(sizes), device=device)
    lora_expand_triton(lora_shrink_triton(x, a, slots), b, slots, out, sizes)
    want = torch.zeros_like(out)
    for t in range(n):
        s = int(slots[t])
        if s < 0:
            continue
        lo = 0
        for i, size in enumerate(sizes):
            y = x[t] @ a[s, i * r : (i + 1) * r].T
            want[t, lo : lo + size] = y @ b[s, lo : lo + size].T
            lo += size
    check(out, want)
