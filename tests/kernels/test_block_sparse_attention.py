"""Block-sparse attention: layouts, and the Triton kernels (forward and backward) against the
masked dense reference."""

import functools

import pytest
import torch

import kiln.kernels.block_sparse_attention as bsa
from kiln.kernels.block_sparse_attention import (
    BlockSparseAttention,
    BlockSparseAttentionFn,
    bigbird_layout,
    block_sparse_attention_ref,
    block_sparse_attention_triton,
    layout_mask,
    layout_to_csr,
    longformer_layout,
)
from kiln.kernels.causal_attention import causal_attention


def test_longformer_layout():
    layout = longformer_layout(6, window=1, global_blocks=1, causal=True)
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 0, 1, 1, 0, 0],
        [1, 0, 0, 1, 1, 0],
        [1, 0, 0, 0, 1, 1],
    ], dtype=torch.bool)  # fmt: skip
    assert torch.equal(layout, expected)
    both = longformer_layout(4, window=0, global_blocks=1, causal=False)
    assert both[0].all() and both[:, 0].all() and both[2, 2] and not both[2, 3]


def test_bigbird_adds_random_blocks_within_reach():
    base = longformer_layout(16, window=1, global_blocks=1)
    layout = bigbird_layout(16, window=1, global_blocks=1, num_random=2, seed=3)
    extra = layout & ~base
    assert (base <= layout).all() and not torch.triu(layout, 1).any()  # causal
    assert extra.sum(1)[4:].eq(2).all()  # every row with room gets 2 random blocks
    assert torch.equal(layout, bigbird_layout(16, 1, 1, 2, seed=3))  # seeded


def test_csr_lists_each_rows_blocks():
    layout = bigbird_layout(9, window=1, global_blocks=2, num_random=1, seed=0)
    cols, nnz = layout_to_csr(layout)
    for i in range(9):
        assert cols[i, : nnz[i]].tolist() == layout[i].nonzero().flatten().tolist()


@pytest.mark.parametrize(
    "seq_len,block,heads,kv_heads,causal",
    [(80, 16, 2, 1, True), (45, 16, 4, 2, False), (64, 32, 2, 2, True)],
)
def test_kernel_matches_masked_dense(dtype, device, check, poisoned, seq_len, block, heads,
                                     kv_heads, causal):  # fmt: skip
    n = -(-seq_len // block)
    layout = bigbird_layout(n, window=1, global_blocks=1, num_random=1, seed=1, causal=causal)
    q = torch.randn(2, seq_len, heads, 16, device=device, dtype=dtype)
    k = torch.randn(2, seq_len, kv_heads, 16, device=device, dtype=dtype)
    v = torch.randn(2, seq_len, kv_heads, 16, device=device, dtype=dtype)
    out = poisoned(block_sparse_attention_triton, q, k, v, layout, block, 0.25, causal)
    check(out, block_sparse_attention_ref(q, k, v, layout, block, 0.25, causal))


def test_full_layout_is_causal_attention(device, check):
    """All blocks on: exactly plain causal attention (the mask is right at token level)."""
    q, k, v = (torch.randn(1, 50, 2, 16, device=device) for _ in range(3))
    full = torch.ones(4, 4, dtype=torch.bool)
    check(block_sparse_attention_triton(q, k, v, full, 16, 0.25), causal_attention(q, k, v, 0.25))
    mask = layout_mask(full, 16, 50, causal=True)
    assert torch.equal(mask, torch.ones(50, 50, dtype=torch.bool).tril())


def test_backend_in_the_model(hf_model_dir):
    """A model forward under the backend (the reference on CPU, the kernels on CUDA), and
    backward through it."""
    import kiln

    path, _ = hf_model_dir("llama")
    model = kiln.load_model(path, dtype="float32", device="cpu")
    backend = BlockSparseAttention(
        functools.partial(longformer_layout, window=1, global_blocks=1), block=16
    )
    ids = torch.randint(3, 300, (1, 70))
    dense = BlockSparseAttention(lambda n: torch.ones(n, n, dtype=torch.bool), block=16)
    with torch.no_grad():
        assert (model(ids, backend=dense) - model(ids)).abs().max() < 1e-4  # == causal
        sparse = model(ids, backend=backend)
    assert (sparse - model(ids)).abs().max() > 1e-3  # the window matters past 32 tokens
    assert torch.equal(backend.layout(70), longformer_layout(5, 1, 1))
    for p in model.parameters():
        p.requires_grad_(True)
    model(ids, backend=backend).logsumexp(-1).mean().backward()
    assert model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def _layout(pattern: str, num_blocks: int, causal: bool) -> torch.Tensor:
    if pattern == "longformer":
        return longformer_layout(num_blocks, window=1, global_blocks=1, causal=causal)
    return bigbird_layout(num_blocks, window=0, global_blocks=1, num_random=1, seed=2,
                          causal=causal)  # fmt: skip


def test_forward_saves_the_log_sum_exp(device):
    """The LSE the backward reads: ln sum exp(scale q.k) over each row's keys, [B, Hq, T]."""
    layout = _layout("bigbird", 4, causal=True)
    q = torch.randn(2, 60, 4, 16, device=device)
    k, v = (torch.randn(2, 60, 2, 16, device=device) for _ in range(2))
    _, lse = bsa._forward(q, k, v, layout, 16, 0.25, causal=True, with_lse=True)
    scores = torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(2, dim=2)) * 0.25
    mask = layout_mask(layout.to(device), 16, 60, causal=True)
    expected = scores.masked_fill(~mask, float("-inf")).logsumexp(-1)
    assert lse.shape == (2, 4, 60) and (lse - expected).abs().max() < 1e-5


@pytest.mark.parametrize(
    "pattern,causal,seq_len,heads,kv_heads",
    [
        ("longformer", True, 72, 4, 2),
        ("bigbird", True, 72, 4, 2),
        ("longformer", False, 45, 4, 2),
        ("bigbird", False, 64, 2, 2),
    ],
)
def test_gradients_match_masked_dense(dtype, device, check, pattern, causal, seq_len, heads,
                                      kv_heads):  # fmt: skip
    """dq, dk, dv of the Triton backward against autograd through the float32 reference;
    k and v are strided views of one tensor, as a fused projection gives them, and the
    output's gradient is a transposed view."""
    layout = _layout(pattern, -(-seq_len // 16), causal)
    q = torch.randn(2, seq_len, heads, 16, device=device, dtype=dtype, requires_grad=True)
    kv = torch.randn(2, seq_len, 2, kv_heads, 16, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(2, heads, seq_len, 16, device=device, dtype=dtype).transpose(1, 2)
    out = BlockSparseAttentionFn.apply(q, *kv.unbind(2), layout, 16, 0.25, causal)
    dq, dkv = torch.autograd.grad(out, (q, kv), grad_out)
    q32, kv32 = (t.detach().float().requires_grad_() for t in (q, kv))
    ref = block_sparse_attention_ref(q32, *kv32.unbind(2), layout, 16, 0.25, causal)
    ref_dq, ref_dkv = torch.autograd.grad(ref, (q32, kv32), grad_out.float())
    check(out, ref.to(dtype))
    check(dq, ref_dq.to(dtype))
    check(dkv[:, :, 0], ref_dkv[:, :, 0].to(dtype))  # dk
    check(dkv[:, :, 1], ref_dkv[:, :, 1].to(dtype))  # dv


def test_training_step_through_the_kernels_matches_the_reference(hf_model_dir, monkeypatch):
    """A model's loss gradients through the Triton forward and backward (the interpreter on
    CPU) equal those through the masked dense reference."""
    import kiln

    path, _ = hf_model_dir("llama")
    model = kiln.load_model(path, dtype="float32", device="cpu")
    backend = BlockSparseAttention(
        functools.partial(bigbird_layout, window=1, global_blocks=1, num_random=1), block=16
    )
    ids = torch.randint(3, 300, (2, 70))

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(ids, backend=backend).logsumexp(-1).mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    for p in model.parameters():
        p.requires_grad_(True)
    expected = grads()
    backward_calls = []
    backward = bsa._backward
    monkeypatch.setattr(bsa, "use_triton", lambda x: True)
    monkeypatch.setattr(bsa, "_backward", lambda *a: backward_calls.append(1) or backward(*a))
    actual = grads()
    assert len(backward_calls) == model.config.num_layers
    for name, g in expected.items():
        err = (actual[name] - g).abs().max() / g.abs().max().clamp_min(1e-12)
        assert err < 1e-4, f"{name}: relative error {err:.1e}"


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["longformer", "bigbird"])
def test_kernel_at_4k_tokens(check, pattern):
    """The benchmark's shape: 4096 tokens, blocks of 64, 16/8 heads of 128, bfloat16."""
    n = 4096 // 64
    layout = (longformer_layout(n, 4, 1) if pattern == "longformer"
              else bigbird_layout(n, 3, 2, 3))  # fmt: skip
    q = torch.randn(1, 4096, 16, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 4096, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out = block_sparse_attention_triton(q, k, v, layout, 64, 128**-0.5)
    check(out, block_sparse_attention_ref(q, k, v, layout, 64, 128**-0.5))


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["longformer", "bigbird"])
def test_gradients_at_4k_tokens(check, pattern):
    """The benchmark's shape, forward and backward, against the float32 reference."""
    n = 4096 // 64
    layout = (longformer_layout(n, 4, 1) if pattern == "longformer"
              else bigbird_layout(n, 3, 2, 3))  # fmt: skip
    q = torch.randn(1, 4096, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 4096, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))  # fmt: skip
    grad_out = torch.randn_like(q)
    out = BlockSparseAttentionFn.apply(q, k, v, layout, 64, 128**-0.5, True)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = block_sparse_attention_ref(*inputs, layout, 64, 128**-0.5)
    for g, r in zip(grads, torch.autograd.grad(ref, inputs, grad_out.float())):
        check(g, r.to(torch.bfloat16))
