"""Sampler: one batched pass from logits to next tokens, every request with its own settings.

Order: penalties (repetition over prompt + output, presence/frequency over output) and
min_tokens' EOS mask act on the logits; logprobs are reported from the model's own distribution
(log_softmax of the raw logits, as vLLM does); then greedy rows take the argmax and the others
divide by their temperature, keep top_k / top_p / min_p, and draw with exponential noise
(argmax of p / q, q ~ Exp(1)). A request with a seed draws its noise from its own generator, so
its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.engine.sequence import Sequence


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float]  # log-probability of each sampled token
    top_logprobs: list[dict[int, float] | None]  # top-N (+ the sampled token) where asked


def make_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """The generator of completion `index` of a request seeded with `seed`."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + index) % 2**63 if index else seed)
    return g


class Sampler:
    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """logits [B, V] (any float dtype) for seqs[i] -> one token each."""
        logits = logits.float()
        raw = logits.clone() if self._needs_raw(seqs) else logits
        log_z = torch.logsumexp(raw, dim=-1)  # [B]
        if any(s.params.has_penalties for s in seqs):
            logits = self._apply_penalties(logits, seqs)
        self._mask_early_stop(logits, seqs)
        tokens = logits.argmax(dim=-1)
        sampled_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if sampled_rows:
            rows = torch.tensor(sampled_rows, device=logits.device)
            tokens[rows] = self._sample(logits[rows], [seqs[i] for i in sampled_rows])
        token_lp = raw.gather(1, tokens[:, None]).squeeze(1) - log_z
        top = self._top_logprobs(raw, log_z, tokens, seqs)
        return SampleResult(tokens.tolist(), token_lp.tolist(), top)

    @staticmethod
    def _needs_raw(seqs: list[Sequence]) -> bool:
        """Whether logits get modified in place before logprobs are read off the raw ones."""
        return any(s.params.has_penalties or s.params.min_tokens for s in seqs)

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        b, v = logits.shape
        dev = logits.device
        counts = torch.zeros(b, v, device=dev)  # output-token counts
        seen = torch.zeros(b, v, dtype=torch.bool, device=dev)  # prompt or output
        for i, s in enumerate(seqs):
            if not s.params.has_penalties:
                continue
            out = torch.tensor(s.output_token_ids, dtype=torch.long, device=dev)
            counts[i].index_add_(0, out, torch.ones(len(out), device=dev))
            seen[i, torch.tensor(s.token_ids, dtype=torch.long, device=dev)] = True
        rep = torch.tensor([s.params.repetition_penalty for s in seqs], device=dev)[:, None]
        pres = torch.tensor([s.params.presence_penalty for s in seqs], device=dev)[:, None]
        freq = torch.tensor([s.params.frequency_penalty for s in seqs], device=dev)[:, None]
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
        return logits - freq * counts - pres * (counts > 0).float()

    @staticmethod
    def _mask_early_stop(logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Before min_tokens are out, EOS and stop_token_ids cannot be drawn."""
        for i, s in enumerate(seqs):
            if s.num_output_tokens < s.params.min_tokens:
                stop = set(s.params.stop_token_ids)
                if not s.params.ignore_eos:
                    stop |= s.eos_token_ids
                if stop:
                    logits[i, sorted(stop)] = float("-inf")

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        dev = logits.device
        temp = torch.tensor([s.params.temperature for s in seqs], device=dev)[:, None]
        logits = logits / temp
        top_k = [s.params.top_k for s in seqs]
        top_p = [s.params.top_p for s in seqs]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            logits = _top_k_top_p(logits, top_k, top_p)
        probs = torch.softmax(logits, dim=-1)
        min_p = [s.params.min_p for s in seqs]
        if any(m > 0 for m in min_p):
            floor = torch.tensor(min_p, device=dev)[:, None] * probs.max(-1, keepdim=True).values
            probs = probs.masked_fill(probs < floor, 0.0)
        # Exp(1) noise as -log(U): one draw for every unseeded row (5x faster than
        # exponential_() on CPU, the same on GPU).
        noise = torch.rand_like(probs).log_().neg_()
        for i, s in enumerate(seqs):
            if s.generator is not None:  # seeded rows redraw from their own generator
                noise[i].exponential_(generator=s.generator)
        return probs.div_(noise).argmax(dim=-1)

    @staticmethod
    def _top_logprobs(
        raw: torch.Tensor, log_z: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence]
    ) -> list[dict[int, float] | None]:
        wanted = [s.params.logprobs for s in seqs]
        out: list[dict[int, float] | None] = [None] * len(seqs)
        k = max((w for w in wanted if w is not None), default=None)
        if k is None:
            return out
        rows = [i for i, w in enumerate(wanted) if w is not None]
        logprobs = torch.full_like(raw, float("-inf"))
        logprobs[rows] = raw[rows] - log_z[rows, None]
        vals, ids = logprobs[rows].topk(max(k, 1), dim=-1) if k else (None, None)
        chosen = logprobs[rows].gather(1, tokens[rows][:, None]).squeeze(1).tolist()
        for j, i in enumerate(rows):
            d = {}
            if wanted[i]:
                d = dict(zip(ids[j, : wanted[i]].tolist(), vals[j, : wanted[i]].tolist()))
            d[int(tokens[i])] = chosen[j]
            out[i] = d
        return out


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask logits [B, V] outside each row's top_k and top_p nucleus with -inf."""
    b, v = logits.shape
    dev = logits.device
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.tensor([kk if kk > 0 else v for kk in top_k], device=dev)[:, None]
    rank = torch.arange(v, device=dev)[None, :]
    sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
    p = torch.tensor(top_p, device=dev)[:, None]
    probs = sorted_logits.softmax(-1)
    drop = probs.cumsum(-1) - probs > p  # keep the smallest set whose mass reaches top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
