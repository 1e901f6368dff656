"""The Sampler's draws follow the distribution the parameters define."""

from types import SimpleNamespace

import torch

from kiln.engine.sampler import Sampler, make_generator
from kiln.engine.sampling_params import SamplingParams


def _seq(params: SamplingParams, generator=None):
    return SimpleNamespace(
        params=params,
        generator=generator,
        num_output_tokens=1,
        num_pending=0,
        eos_token_ids=frozenset(),
        grammar=None,
    )


def _frequencies(logits: torch.Tensor, seqs, draws: int) -> torch.Tensor:
    sampler = Sampler(logits.shape[-1])
    counts = torch.zeros(logits.shape[-1])
    for _ in range(draws // len(seqs)):
        tokens = sampler(logits.expand(len(seqs), -1).clone(), seqs).token_ids
        counts += torch.bincount(torch.tensor(tokens), minlength=logits.shape[-1])
    return counts / counts.sum()


def test_unseeded_draws_follow_the_tempered_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    params = SamplingParams(temperature=0.7, max_tokens=1)
    freq = _frequencies(logits, [_seq(params)] * 50, 20_000)
    want = torch.softmax(logits[0] / 0.7, -1)
    assert (freq - want).abs().max() < 0.015


def test_seeded_draws_follow_top_p_and_repeat():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    params = SamplingParams(temperature=1.0, top_p=0.8, seed=3, max_tokens=1)
    seqs = [_seq(params, make_generator(3, i, torch.device("cpu"))) for i in range(40)]
    freq = _frequencies(logits, seqs, 16_000)
    probs = torch.softmax(logits[0], -1)
    kept = probs[:2] / probs[:2].sum()  # 0.665 + 0.245 reaches 0.8 with two tokens
    assert freq[2:].sum() == 0 and (freq[:2] - kept).abs().max() < 0.015
    again = [_seq(params, make_generator(3, i, torch.device("cpu"))) for i in range(40)]
    tokens = Sampler(5)(logits.expand(40, -1).clone(), again).token_ids
    fresh = [_seq(params, make_generator(3, i, torch.device("cpu"))) for i in range(40)]
    assert Sampler(5)(logits.expand(40, -1).clone(), fresh).token_ids == tokens
