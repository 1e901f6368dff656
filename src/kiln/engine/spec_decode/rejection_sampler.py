"""Verification of speculative tokens by rejection sampling (Leviathan et al. 2023, Chen et
al. 2023): lossless, the tokens that come out are distributed as the target's own samples.

A sequence that proposed k tokens d_1..d_k runs them through the target in one forward and
gets k + 1 rows of logits: row j is the target's next-token distribution p_j after d_1..d_j.
Each row is processed exactly as the sampler would process it at that position (penalties over
the tokens before it, the min_tokens mask, temperature, top-k/top-p/min-p). Draft token d_{j+1}
is accepted with probability min(1, p_j(d) / q_j(d)), q_j being the distribution it was drawn
from (a point mass for prompt lookup and greedy drafts); at the first rejection the row
resamples from the residual max(0, p_j - q_j) (normalized), and when all k are accepted row k
gives a bonus token from p_k. Greedy rows are the temperature-0 case: a draft is accepted when
it is the argmax, and the argmax is the row's token either way.
"""

from __future__ import annotations

import torch

from kiln.engine.sampler import PendingSample, Sampler
from kiln.engine.sequence import Sequence
from kiln.engine.transfer import to_device


class SeqAt:
    """A sequence as it would stand after `extra` speculative tokens: what the sampler reads
    of a sequence (its settings, its tokens so far, its generator)."""

    num_pending = 0

    def __init__(self, seq: Sequence, extra: list[int]):
        self.seq, self.extra = seq, extra
        self.params, self.generator = seq.params, seq.generator
        self.eos_token_ids = seq.eos_token_ids
        self.num_prompt_tokens = seq.num_prompt_tokens

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids + self.extra

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return self.seq.num_output_tokens + len(self.extra)


def rejection_sample(
    p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """p [R, V] the target's distributions, q [R, V] the draft's (zero rows where no draft
    token is verified), draft [R] the draft tokens (-1: none), u [R] uniforms in [0, 1):
    (accepted [R] bool: u < p(d) / q(d), the residual [R, V] max(0, p - q), unnormalized,
    that a row resamples from when it is reached and not accepted; p itself where no draft)."""
    d = draft.clamp(min=0)[:, None]
    p_d, q_d = p.gather(1, d)[:, 0], q.gather(1, d)[:, 0]
    accepted = (draft >= 0) & (u * q_d < p_d)
    return accepted, (p - q).clamp_(min=0)


@torch.inference_mode()
def verify(
    sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence]
) -> tuple[PendingSample, torch.Tensor]:
    """The target's logits [R, V] (for each sequence, a row per speculative token and one past
    them) -> (the token each row settles on, with its logprobs: the accepted draft token, or a
    sample from the residual (from p on the row past the drafts); whether each row's draft
    token was accepted [R] bool). A sequence keeps its rows up to its first rejection."""
    dev = logits.device
    rows: list[SeqAt] = []
    draft: list[int] = []
    for seq in seqs:
        spec = seq.spec_token_ids
        rows += [SeqAt(seq, spec[:j]) for j in range(len(spec) + 1)]
        draft += [*spec, -1]
    logits, raw, log_z = sampler.process(logits, rows)
    tokens = logits.argmax(dim=-1)
    draft_d = to_device(draft, torch.long, dev)
    accepted = tokens == draft_d  # greedy rows: the argmax decides, and is the token
    sampled = [r for r, row in enumerate(rows) if not row.params.greedy]
    if sampled:
        idx = to_device(sampled, torch.long, dev)
        views = [rows[r] for r in sampled]
        p = sampler.probs(logits[idx], views)
        d = draft_d[idx]
        q = _draft_probs(p, seqs, sampled)
        ok, residual = rejection_sample(p, q, d, _uniforms(views, dev))
        tokens[idx] = torch.where(ok, d, sampler.draw(residual, views))
        accepted[idx] = ok
    return sampler.pending(tokens, raw, log_z, rows), accepted


def _draft_probs(p: torch.Tensor, seqs: list[Sequence], sampled: list[int]) -> torch.Tensor:
    """q [len(sampled), V]: the draft distribution of each sampled row's draft token (its
    sequence's spec_probs row, else a point mass on it); zeros where the row has none."""
    q = torch.zeros_like(p)
    where = {r: i for i, r in enumerate(sampled)}
    points: list[tuple[int, int]] = []
    r = 0
    for seq in seqs:
        spec = seq.spec_token_ids
        for j, token in enumerate(spec):
            i = where.get(r + j)
            if i is None:
                continue
            if seq.spec_probs is None:
                points.append((i, token))
            else:
                q[i] = seq.spec_probs[j]
        r += len(spec) + 1
    if points:
        index = to_device(list(zip(*points)), torch.long, p.device)
        q[index[0], index[1]] = 1.0
    return q


def _uniforms(views: list[SeqAt], device: torch.device) -> torch.Tensor:
    """One uniform per row; seeded rows that verify a draft token draw theirs from their own
    generator, in row order, so that a seeded request is reproducible in any batch."""
    u = torch.rand(len(views), device=device)
    seeded = [
        i for i, v in enumerate(views)
        if v.generator is not None and len(v.extra) < len(v.seq.spec_token_ids)
    ]  # fmt: skip
    if seeded:
        draws = [torch.rand(1, generator=views[i].generator, device=device) for i in seeded]
        u[to_device(seeded, torch.long, device)] = torch.cat(draws)
    return u
