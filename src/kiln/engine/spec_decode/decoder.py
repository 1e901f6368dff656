"""SpecDecoder: what the engine core asks of speculative decoding each step.

    schedule (decodes reserve 1 + k slots) -> propose (the proposer fills seq.spec_token_ids;
    unused slots go back) -> one target forward over every sequence's input token and its
    proposals -> accept (rejection sampling, kiln.engine.spec_decode.rejection_sampler) ->
    the scheduler keeps the accepted tokens' K/V and returns the rest.

Speculation runs only while at most `disable_by_batch_size` sequences are live (a verify step
costs more than it saves once a batch is compute bound) and in lockstep (the proposals need the
tokens of the previous step); other steps are plain decode steps, CUDA graphs and async
scheduling included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kiln.engine.config import EngineConfig
from kiln.engine.model_runner import ModelRunner
from kiln.engine.sampler import Sampler, SampleResult
from kiln.engine.scheduler import Scheduler, SchedulerOutput
from kiln.engine.sequence import Sequence
from kiln.engine.spec_decode.config import HIDDEN_METHODS, SpeculativeConfig
from kiln.engine.spec_decode.draft_model import (
    DraftModelProposer,
    kv_bytes_per_block,
    load_draft_model,
)
from kiln.engine.spec_decode.heads import DraftHead
from kiln.engine.spec_decode.hidden import hidden_proposer, load_heads, target_runner_args
from kiln.engine.spec_decode.ngram import NgramProposer
from kiln.engine.spec_decode.rejection_sampler import verify
from kiln.model.transformer import Transformer


@dataclass
class SpecDecodeStats:
    """Acceptance counters since start (vLLM's spec_decode_* metrics)."""

    num_spec_tokens: int
    num_drafts: int = 0  # verify rows that carried at least one proposed token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)  # accepted at position 0, 1, ...

    def __post_init__(self) -> None:
        self.accepted_per_pos = [0] * self.num_spec_tokens

    def observe(self, num_draft: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += num_accepted
        for pos in range(num_accepted):
            self.accepted_per_pos[pos] += 1

    @property
    def acceptance_rate(self) -> float:
        """Accepted over proposed tokens (0 before any)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens a verify step gives a sequence, on average: 1 + accepted per draft."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def as_dict(self) -> dict:
        return {
            "spec_decode_num_drafts": self.num_drafts,
            "spec_decode_num_draft_tokens": self.num_draft_tokens,
            "spec_decode_num_accepted_tokens": self.num_accepted_tokens,
            "spec_decode_num_accepted_tokens_per_pos": list(self.accepted_per_pos),
            "spec_decode_acceptance_rate": self.acceptance_rate,
            "spec_decode_mean_acceptance_length": self.mean_acceptance_length,
        }


def load_draft(spec: SpeculativeConfig | None, target_dir, max_model_len: int, net: Transformer):
    """The config's draft for the target `net` (loaded from `target_dir`): a Transformer
    (draft_model), a DraftHead (medusa, eagle, early_exit with a `model`), else None."""
    if spec is not None and spec.method == "draft_model":
        return load_draft_model(spec, net.config, target_dir, max_model_len, net)
    return load_heads(spec, net)


def runner_args(spec: SpeculativeConfig | None, draft, block_size: int) -> dict:
    """The target ModelRunner's arguments for the draft: what it keeps for it, and the bytes
    of the draft's own KV per block (paid from the target's budget)."""
    if isinstance(draft, Transformer):
        return {"extra_kv_bytes_per_block": kv_bytes_per_block(draft, block_size)}
    return target_runner_args(spec, draft, block_size)


class SpecDecoder:
    """A proposer (NgramProposer, DraftModelProposer, or one of kiln.engine.spec_decode.hidden)
    and the acceptance counters."""

    def __init__(self, config: SpeculativeConfig, proposer):
        self.config = config
        self.proposer = proposer
        self.stats = SpecDecodeStats(config.num_speculative_tokens)

    @classmethod
    def build(
        cls,
        config: EngineConfig,
        draft: Transformer | DraftHead | None,
        target: ModelRunner,
        max_model_len: int,
    ) -> SpecDecoder | None:
        """The engine's decoder (None when config.speculative_config is not given, or does
        not verify); `draft`: what load_draft loaded, `target`: the target's runner."""
        spec = config.speculative
        if spec is None or not spec.verify:
            return None
        if spec.method == "draft_model":
            proposer = DraftModelProposer(draft, config, max_model_len, target.num_blocks)
        elif spec.method in HIDDEN_METHODS:
            proposer = hidden_proposer(spec, draft, target, config, max_model_len)
        else:
            k, lo, hi = spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max
            proposer = NgramProposer(k, lo, hi)
        return cls(spec, proposer)

    @property
    def num_spec_tokens(self) -> int:
        return self.config.num_speculative_tokens

    def active(self, num_live: int) -> bool:
        """Whether a step with `num_live` live sequences speculates."""
        return num_live <= self.config.disable_by_batch_size

    def propose(self, out: SchedulerOutput, scheduler: Scheduler, sampler: Sampler) -> None:
        """Proposals for the decodes that reserved speculative slots (unused ones go back)."""
        idx = [i for i, k in enumerate(out.num_spec_tokens) if k]
        if not idx:
            return
        seqs = [out.seqs[i] for i in idx]
        proposals = self.proposer.propose(seqs, [out.num_spec_tokens[i] for i in idx], sampler)
        for i, tokens in zip(idx, proposals):
            scheduler.set_spec(out, i, tokens)

    def accept(
        self, sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence]
    ) -> tuple[SampleResult, list[slice]]:
        """Verify every sequence's proposals against the target's logits [R, V] (rows as
        ModelRunner lays them out): the rows' tokens and logprobs, and for each sequence the
        rows it keeps (its accepted proposals, then the resampled or bonus token)."""
        sample, accepted = verify(sampler, logits, seqs)
        result, ok = sample.result(), accepted.tolist()
        kept, r = [], 0
        for seq in seqs:
            k = len(seq.spec_token_ids)
            a = 0
            while a < k and ok[r + a]:
                a += 1
            if k:
                self.stats.observe(k, a)
            kept.append(slice(r, r + a + 1))
            r += k + 1
        return result, kept

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write copies of the step, in the proposer's own KV pool if it has one."""
        self.proposer.copy_blocks(copies)
