"""The fused sampling kernel against torch: greedy rows exactly, logprobs closely, sampled
rows in distribution (the kernel's Philox noise and the reference's torch noise differ)."""

import pytest
import torch

from kiln.kernels.sample import INTERPRETER_CONFIG, sample, sample_ref, sample_triton

INF = float("-inf")
# The interpreter's chunk (split or not): the tests' vocabularies span several of them.
CHUNK = INTERPRETER_CONFIG["BLOCK_V"]
assert INTERPRETER_CONFIG["SPLIT_BLOCK_V"] == CHUNK


def _seeds(b: int, device, offset: int = 0) -> torch.Tensor:
    return (torch.arange(b, dtype=torch.int64) * 1_000_003 + 12_345 + offset).to(device)


def _raw_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), -1).gather(1, tokens[:, None]).squeeze(1)


def _tied_logits(dtype, device) -> torch.Tensor:
    """[8, 3.5 chunks]: random rows, and rows whose max is tied across chunks and lanes."""
    v = 3 * CHUNK + CHUNK // 2
    x = torch.randn(8, v) * 3
    x[1, [CHUNK + 7, 5, 2 * CHUNK + 5, v - 1]] = 50.0  # first tie at 5, same lane as 2C + 5
    x[2] = 0.0  # all tied: index 0
    x[3, [3 * CHUNK + 1, CHUNK + 2, 2 * CHUNK + 1]] = 50.0  # first tie in the second chunk
    x[4] = torch.randint(-2, 3, (v,)).float()  # few values, ties everywhere
    x[5, : 2 * CHUNK] = INF  # the max lies past masked chunks
    x[6] = INF  # nothing left: torch says 0
    x[7, ::3] = INF
    x[7, [2 * CHUNK + 9, 3 * CHUNK + 3]] = 7.0  # tie in the partial last chunk
    return x.to(dtype).to(device)


# Row 6 (all -inf) has a NaN logprob, as in torch; the interpreter warns on the way.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("greedy_first", [True, False])
def test_greedy_rows_are_torch_argmax(dtype, device, greedy_first, num_splits):
    x = _tied_logits(dtype, device)
    greedy = (torch.arange(8) % 2 == 0) == greedy_first
    temperature = torch.where(greedy, torch.tensor([0.0, -1.0] * 4), 0.8).to(device)
    expected = x.float().argmax(-1)
    for tokens, _ in (
        sample_triton(x, temperature, _seeds(8, device), num_splits),
        sample_ref(x, temperature),
    ):
        assert tokens.dtype == torch.int64 and tokens.shape == (8,)
        assert torch.equal(tokens[greedy.to(device)], expected[greedy.to(device)])
    all_greedy = torch.zeros(8, device=device)
    assert torch.equal(sample_triton(x, all_greedy, _seeds(8, device), num_splits)[0], expected)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_logprobs_are_raw_log_softmax(dtype, device, num_splits):
    v = 2 * CHUNK + 44
    buffer = torch.randn(6, v + 20) * 4  # rows strided wider than the vocabulary
    buffer[1, ::2] = INF
    buffer[2, 1:] = INF  # one finite logit: logprob 0
    buffer[3, : CHUNK + 3] = INF
    x = buffer.to(dtype).to(device)[:, :v]
    temperature = torch.tensor([0.0, 1.0, 0.7, 0.0, 1.3, 0.5], device=device)
    for tokens, logprobs in (
        sample_triton(x, temperature, _seeds(6, device), num_splits),
        sample_ref(x, temperature),
    ):
        assert logprobs.dtype == torch.float32 and torch.isfinite(logprobs).all()
        torch.testing.assert_close(logprobs, _raw_logprobs(x, tokens), rtol=1e-5, atol=1e-5)
        assert torch.isfinite(x.gather(1, tokens[:, None]).float()).all()


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_sampled_frequencies_follow_softmax(device, impl):
    """300 draws at each of two temperatures over 8 live tokens scattered through a masked
    row: chi-square vs softmax(logits / T), 7 degrees of freedom (P(> 35) ~ 1e-5)."""
    n, temps = 300, (0.6, 1.5)
    live = torch.tensor([0, 3, 17, 50, 64, 100, CHUNK - 2, CHUNK - 1])
    logits = torch.full((CHUNK,), INF)
    logits[live] = torch.linspace(-0.5, 1.0, len(live))
    x = logits.expand(2 * n, -1).contiguous().to(device)
    temperature = torch.tensor(temps).repeat_interleave(n).to(device)
    if impl == "triton":
        tokens, logprobs = sample_triton(x, temperature, _seeds(2 * n, device))
    else:
        gen = torch.Generator(device=device).manual_seed(2024)
        tokens, logprobs = sample_ref(x, temperature, gen)
    torch.testing.assert_close(logprobs, _raw_logprobs(x, tokens), rtol=1e-5, atol=1e-5)
    for half, t in zip(tokens.cpu().view(2, n), temps):
        counts = torch.bincount(half, minlength=CHUNK).double()
        assert counts.sum() == counts[live].sum(), "a masked token was drawn"
        expected = n * torch.softmax(logits[live].double() / t, -1)
        chi2 = ((counts[live] - expected) ** 2 / expected).sum().item()
        assert chi2 < 35.0, f"T={t}: chi-square {chi2:.1f} over 7 degrees of freedom"


def test_seeds_decide_the_draw(device):
    b, v = 16, 3 * CHUNK
    x = torch.randn(b, v, device=device)
    temperature = torch.ones(b, device=device)
    seeds = _seeds(b, device)
    tokens, _ = sample_triton(x, temperature, seeds)
    assert torch.equal(sample_triton(x, temperature, seeds.clone())[0], tokens)
    other, _ = sample_triton(x, temperature, _seeds(b, device, offset=7))
    assert (other != tokens).sum() >= b // 2  # near-flat rows: a new seed moves most draws
    # A row's draw depends on its own logits and seed, not on the rest of the batch.
    alone, _ = sample_triton(x[5:6], temperature[5:6], seeds[5:6])
    assert alone.item() == tokens[5].item()
    shuffled = torch.randperm(b, device=device)
    again, _ = sample_triton(x[shuffled], temperature[shuffled], seeds[shuffled])
    assert torch.equal(again, tokens[shuffled])


def test_splits_do_not_change_the_result(device):
    """Noise is keyed by (seed, token), so cutting rows into pieces changes nothing."""
    b, v = 4, 5 * CHUNK + 3
    x = torch.randn(b, v, device=device) * 2
    x[1, : 3 * CHUNK] = INF
    temperature = torch.tensor([0.0, 1.0, 0.5, 2.0], device=device)
    seeds = _seeds(b, device)
    tokens, logprobs = sample_triton(x, temperature, seeds, num_splits=1)
    for num_splits in (2, 3, 6, None):
        got = sample_triton(x, temperature, seeds, num_splits)
        assert torch.equal(got[0], tokens)
        torch.testing.assert_close(got[1], logprobs, rtol=1e-6, atol=1e-6)


def test_reference_follows_its_generator(device):
    x = torch.randn(4, 300, device=device)
    temperature = torch.tensor([1.0, 0.0, 0.5, 2.0], device=device)
    gen = lambda: torch.Generator(device=device).manual_seed(99)
    first = sample_ref(x, temperature, gen())
    second = sample_ref(x, temperature, gen())
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    if device == "cpu":  # the dispatcher takes the reference off CUDA and ignores seeds
        via = sample(x, temperature, torch.zeros(4, dtype=torch.int64), gen())
        assert torch.equal(via[0], first[0])


def test_empty_batch(device):
    x = torch.randn(0, 300, device=device)
    tokens, logprobs = sample_triton(x, torch.ones(0, device=device), _seeds(0, device))
    assert tokens.shape == logprobs.shape == (0,)


@pytest.mark.gpu
def test_sample_at_qwen3_vocab():
    b, v = 256, 151936
    x = (torch.randn(b, v, device="cuda") * 3).to(torch.bfloat16)
    greedy = torch.arange(b, device="cuda") % 2 == 0
    temperature = torch.where(greedy, 0.0, 0.8)
    x[greedy.nonzero()[:8, 0], 17] = 100.0  # ties with later chunks
    x[greedy.nonzero()[:8, 0], v - 3] = 100.0
    x[~greedy, ::2] = INF  # sampled rows: only odd tokens live
    x[-1, 140_001] = 100.0  # a sampled row with one token taking all the mass
    seeds = torch.randint(0, 2**62, (b,), device="cuda")
    tokens, logprobs = sample(x, temperature, seeds)
    assert torch.equal(tokens[greedy], x.float().argmax(-1)[greedy])
    assert (tokens[greedy][:8] == 17).all()
    assert (tokens[~greedy] % 2 == 1).all() and tokens[-1].item() == 140_001
    torch.testing.assert_close(logprobs, _raw_logprobs(x, tokens), rtol=1e-5, atol=1e-4)
    assert torch.equal(sample(x, temperature, seeds)[0], tokens)
    # Sampled rows over the full vocabulary spread out: no two of 128 rows share a token.
    flat = torch.zeros(128, v, device="cuda", dtype=torch.bfloat16)
    drawn, _ = sample(flat, torch.ones(128, device="cuda"), seeds[:128])
    assert drawn.unique().numel() >= 120


@pytest.mark.gpu
def test_sampled_tail_at_qwen3_vocab():
    """One token against 151935 zeros, with the odds even: the draw hangs on the smallest of
    151936 exponentials, the noise's far tail. 8192 draws (rows of stride 0, one seed each)."""
    n, v = 8192, 151936
    row = torch.zeros(1, v, device="cuda", dtype=torch.bfloat16)
    row[0, 77_777] = torch.tensor(v - 1.0).log()
    p = torch.softmax(row.float(), -1)[0, 77_777].item()  # ~0.5 after rounding to bf16
    seeds = torch.randint(0, 2**62, (n,), device="cuda")
    tokens, _ = sample_triton(row.expand(n, v), torch.ones(n, device="cuda"), seeds)
    share = (tokens == 77_777).double().mean().item()
    assert abs(share - p) < 5 * (p * (1 - p) / n) ** 0.5, (share, p)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_bitmask_equals_masking_the_logits_first(dtype, device, num_splits):
    """Structured outputs' bitmask fused into the pass: the same tokens (same seeds) and
    logprobs as the kernel on logits already set to -inf where a bit is clear; every row keeps
    a few allowed tokens, one row allows all and one a single token."""
    from kiln.engine.structured import apply_bitmask_ref

    b, v = 6, 2 * CHUNK + 45  # a partial last word
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(b, v, generator=g) * 3).to(dtype).to(device)
    words = (v + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31 - 1, (b, words), generator=g, dtype=torch.int64)
    bitmask = (bitmask & torch.randint(-(2**31), 2**31 - 1, (b, words), generator=g)).int()
    bitmask[1] = -1  # everything allowed
    bitmask[2] = 0
    bitmask[2, 70 // 32] = 1 << (70 % 32)  # only token 70
    bitmask = bitmask.to(device)
    temperature = torch.tensor([0.0, 1.0, 0.7, 0.0, 1.3, 0.5], device=device)
    seeds = _seeds(b, device)
    masked = x.clone()
    apply_bitmask_ref(masked, bitmask)
    fused = sample_triton(x, temperature, seeds, num_splits, bitmask=bitmask)
    first = sample_triton(masked, temperature, seeds, num_splits)
    assert torch.equal(fused[0], first[0])
    torch.testing.assert_close(fused[1], first[1], rtol=1e-6, atol=1e-6)
    assert fused[0][2].item() == 70
    assert torch.isfinite(masked.gather(1, fused[0][:, None]).float()).all()
    ref = sample_ref(x, temperature, bitmask=bitmask)
    greedy = (temperature == 0).to(device)
    assert torch.equal(ref[0][greedy], first[0][greedy])
    torch.testing.assert_close(ref[1], _raw_logprobs(masked, ref[0]), rtol=1e-5, atol=1e-5)
