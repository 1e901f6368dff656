"""The reference generation loop: KV cache against full recompute, sampling, the CLI."""

import pytest
import torch

import kiln
from kiln.generate import generate, sample_next


def test_kv_cache_matches_full_recompute(hf_model_dir):
    model = kiln.load_model(hf_model_dir("mistral")[0], device="cpu")  # sliding window 8
    ids = torch.randint(3, 256, (2, 5))
    out = generate(model, ids, max_new_tokens=20)
    seq = ids
    with torch.no_grad():
        for _ in range(20):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_seeded_sampling_is_reproducible(hf_model_dir):
    model = kiln.load_model(hf_model_dir("qwen3")[0], device="cpu")
    ids = torch.randint(3, 256, (1, 4))
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.9)
    a = generate(model, ids, seed=7, **kw)
    b = generate(model, ids, seed=7, **kw)
    c = generate(model, ids, seed=8, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert picks <= {0, 1} and len(picks) == 2
    # softmax probs ~ [.64, .24, .09, ...]: top_p 0.7 keeps two tokens
    picks = {int(sample_next(logits, 1.0, top_p=0.7, generator=g)) for _ in range(200)}
    assert picks == {0, 1}


def test_stops_at_eos(hf_model_dir):
    model = kiln.load_model(hf_model_dir("llama")[0], device="cpu")
    ids = torch.randint(3, 256, (1, 4))
    first = int(generate(model, ids, max_new_tokens=1)[0, -1])
    out = generate(model, ids, max_new_tokens=10, eos_token_ids={first})
    assert out.shape[1] == 5


def test_context_overflow_names_both_numbers(hf_model_dir):
    model = kiln.load_model(hf_model_dir("llama")[0], device="cpu")
    with pytest.raises(ValueError, match="250 tokens.*10.*256"):
        generate(model, torch.ones(1, 250, dtype=torch.long), max_new_tokens=10)
