"""Sequence: one completion's tokens and its place in the KV pool."""

from __future__ import annotations

import enum

import torch

from kiln.engine.sampling_params import SamplingParams
from kiln.engine.structured import GrammarState


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Sequence:
    """Prompt + generated tokens of one completion; `num_computed_tokens` of them are in the KV."""

    def __init__(
        self,
        seq_id: int,
        request_id: str,
        index: int,
        token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: frozenset[int] = frozenset(),
    ):
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index  # which of the request's completions
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.params = params
        self.eos_token_ids = eos_token_ids
        # the token ids that may end it (EOS unless ignore_eos, stop_token_ids): the engine
        # tests every new token against them
        eos = frozenset() if params.ignore_eos else eos_token_ids
        self.stop_token_set = eos | frozenset(params.stop_token_ids)
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V sit in the pool
        self.num_cached_tokens = 0  # of those, how many came from prefix-cache hits
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # hash of each full block of token_ids, in order
        self.num_registered_blocks = 0  # leading blocks of block_table in the prefix cache
        # Tokens whose K/V were evicted (kiln.engine.kv_eviction; whole blocks): token t >=
        # num_computed_tokens - len(block_table) * block_size sits at cache index
        # t - num_evicted_tokens
        self.num_evicted_tokens = 0
        # Tokens sampled on the GPU whose ids the host has not read yet (async scheduling):
        # they count in len(seq) (the scheduler's view) but are not in token_ids.
        self.num_pending = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.cumulative_logprob = 0.0
        self.generator: torch.Generator | None = None  # per-request seeded sampling
        self.pending_forks = 0  # siblings to fork off when the first token is sampled
        # Speculative decoding (kiln.engine.spec_decode): this step's proposed tokens, the
        # draft's distribution they were drawn from ([k, vocab] on the device; None: point
        # masses), and how many tokens' K/V the draft model holds (its own pool, same blocks).
        self.spec_token_ids: list[int] = []
        self.spec_probs: torch.Tensor | None = None
        self.num_draft_computed = 0
        # Logprobs of prompt tokens 1.. (token 0 has none: None), as the prefill computes
        # them; handed out with the first sampled token (then prompt_logprobs_sent).
        self.prompt_logprobs: list[dict[int, float] | None] | None = None
        if params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]
        self.prompt_logprobs_sent = False
        self.grammar: GrammarState | None = None  # structured outputs: the allowed tokens
        self.lora_request = None  # kiln.engine.lora.LoRARequest: the adapter it runs with

    @property
    def lora_int_id(self) -> int:
        """Its adapter's id (0: the base model)."""
        return self.lora_request.lora_int_id if self.lora_request is not None else 0

    @property
    def cache_salt(self) -> tuple | None:
        """The parent of its first prefix-cache block: blocks under an adapter are its own."""
        return ("lora", self.lora_int_id) if self.lora_request is not None else None

    def __len__(self) -> int:
        """Tokens the sequence has, including any still in flight from the GPU."""
        return len(self.token_ids) + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens the host knows (in flight ones not counted)."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending - self.num_computed_tokens  # len(self)

    def needs_prompt_logprobs(self, start: int, end: int) -> range:
        """The positions in [start, end) whose logits give a prompt token's logprob that
        is not known yet (position p predicts prompt token p + 1)."""
        if self.prompt_logprobs is None or self.prompt_logprobs_sent:
            return range(0)
        return range(
            max(start, len(self.prompt_logprobs) - 1), min(end, self.num_prompt_tokens - 1)
        )

    def fork(self, seq_id: int, index: int) -> Sequence:
        """A sibling with the same tokens and KV blocks (the caller bumps the ref counts)."""
        child = Sequence(
            seq_id, self.request_id, index, self.token_ids, self.params, self.eos_token_ids
        )
        child.num_prompt_tokens = self.num_prompt_tokens
        child.status = self.status
        child.num_computed_tokens = self.num_computed_tokens
        child.num_cached_tokens = self.num_cached_tokens
        child.block_table = list(self.block_table)
        child.block_hashes = list(self.block_hashes)
        child.num_registered_blocks = self.num_registered_blocks
        child.prompt_logprobs = None  # the first completion carries the prompt's
        child.grammar = self.grammar.fork() if self.grammar is not None else None
        child.lora_request = self.lora_request
        child.num_evicted_tokens = self.num_evicted_tokens
        return child

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
