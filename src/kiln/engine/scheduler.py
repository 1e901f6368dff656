"""Scheduler: who runs this step, and how many of their tokens.

Continuous batching, vLLM-v1 style: every sequence has `num_computed_tokens` of its tokens in
the KV pool, and a step computes some of the rest. Running sequences go first (a decode is just
one uncomputed token), then waiting ones in arrival order, all under one per-step token budget;
a prompt longer than what is left of the budget is cut into chunks (chunked prefill). When the
pool runs out, the most recently admitted running sequence is preempted: its blocks are freed
and it goes back to the head of the queue, to be recomputed later (prefix hits make that cheap).

With speculative decoding a decode may also verify up to k proposed tokens: it takes 1 + k
tokens of the budget and slots for them, k cut down to what the budget, the pool (speculation
never preempts) and the sequence's own limits leave; the slots of tokens not proposed or not
accepted go back (`set_spec`, `update`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kiln.engine.block_manager import BlockManager
from kiln.engine.config import EngineConfig
from kiln.engine.kv_eviction import KVEvictor
from kiln.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """The step's work: seqs[i] computes its next num_new_tokens[i] tokens."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)
    # Speculative tokens seqs[i] may verify this step (num_new_tokens[i] = 1 + that): slots
    # reserved by schedule(), the count cut to what was proposed by set_spec().
    num_spec_tokens: list[int] = field(default_factory=list)
    num_preempted: int = 0

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        block_manager: BlockManager,
        max_model_len: int | None = None,
        evictor: KVEvictor | None = None,
    ):
        self.config = config
        self.block_manager = block_manager
        self.evictor = evictor  # KV eviction under a budget (kiln.engine.kv_eviction)
        self.max_model_len = max_model_len or config.max_model_len or 2**62
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self, num_spec_tokens: int = 0) -> SchedulerOutput:
        """The step's work; decodes reserve up to `num_spec_tokens` speculative tokens."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        bm, running, max_len = self.block_manager, self.running, self.max_model_len
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            pending = seq.num_pending
            if pending:  # do its tokens in flight end it by length? (inline: every step)
                n, max_tokens = len(seq.token_ids) + pending, seq.params.max_tokens
                if n >= max_len or (
                    max_tokens is not None and n - seq.num_prompt_tokens >= max_tokens
                ):
                    i += 1  # finishes when its token in flight arrives
                    continue
            if num_spec_tokens and (k := self._spec_room(seq, num_spec_tokens, budget)):
                out.seqs.append(seq)
                out.num_new_tokens.append(1 + k)
                out.num_spec_tokens.append(k)
                budget -= 1 + k
                i += 1
                continue
            num_new = len(seq.token_ids) + pending - seq.num_computed_tokens  # uncomputed
            if num_new > budget:
                num_new = budget
            if self.evictor is not None:
                self.evictor.make_room(seq, num_new)
            while not bm.allocate(seq, num_new):
                victim = running.pop()
                self._preempt(victim)
                out.num_preempted += 1
                if victim is seq:
                    break
            else:
                out.seqs.append(seq)
                out.num_new_tokens.append(num_new)
                out.num_spec_tokens.append(0)
                budget -= num_new
                i += 1
        if not out.num_preempted:
            self._admit_waiting(out, budget)
        out.block_copies = bm.take_copies()
        return out

    def _spec_room(self, seq: Sequence, k: int, budget: int) -> int:
        """How many speculative tokens a decode may verify (its slots allocated), or 0."""
        if seq.num_uncomputed_tokens != 1 or seq.num_pending:
            return 0
        room = self.max_model_len - len(seq)  # tokens the sequence may still gain
        if seq.params.max_tokens is not None:
            room = min(room, seq.params.max_tokens - seq.num_output_tokens)
        k = min(k, room - 1, budget - 1)
        if k < 1 or not self.block_manager.allocate(seq, 1 + k):
            return 0
        return k

    def set_spec(self, out: SchedulerOutput, i: int, token_ids: list[int]) -> None:
        """seqs[i] verifies `token_ids` (at most the reserved count); spare slots go back."""
        seq = out.seqs[i]
        assert len(token_ids) <= out.num_spec_tokens[i]
        seq.spec_token_ids = token_ids
        out.num_spec_tokens[i] = len(token_ids)
        out.num_new_tokens[i] = 1 + len(token_ids)
        self.block_manager.trim(seq, seq.num_computed_tokens + 1 + len(token_ids))

    def _make_room(self, seq: Sequence, num_new: int) -> None:
        if self.evictor is not None:
            self.evictor.make_room(seq, num_new)

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        bm = self.block_manager
        num_seqs = len(self.running)
        adapters = {s.lora_int_id for s in self.running if s.lora_request is not None}
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if num_seqs + 1 + seq.pending_forks > self.config.max_num_seqs:
                break
            if seq.lora_request is not None and seq.lora_int_id not in adapters:
                if len(adapters) >= self.config.max_loras:
                    break  # its adapter waits for a device slot
                adapters.add(seq.lora_int_id)
            if not seq.block_table and seq.params.prompt_logprobs is None:
                bm.match_prefix(seq)  # (prompt logprobs need every prompt token computed)
            num_new = seq.num_uncomputed_tokens
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            self._make_room(seq, num_new)
            if not bm.allocate(seq, num_new):
                bm.free(seq)  # give back the prefix hits; try again next step
                seq.num_cached_tokens = 0
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_new_tokens.append(num_new)
            out.num_spec_tokens.append(0)
            budget -= num_new
            num_seqs += 1 + seq.pending_forks

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.block_manager.free(seq)
        seq.spec_token_ids, seq.spec_probs = [], None
        seq.num_cached_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def update(self, out: SchedulerOutput, num_accepted: list[int] | None = None) -> None:
        """Advance the computed counts after the model ran; register newly full blocks. A
        verify step keeps the K/V of its input token and of the `num_accepted[i]` accepted
        speculative tokens; the slots of the rejected ones go back."""
        bm = self.block_manager
        if num_accepted is None:  # (every step but a verify one: a tight loop)
            bs = bm.block_size
            for seq, num_new in zip(out.seqs, out.num_new_tokens):
                computed = seq.num_computed_tokens = seq.num_computed_tokens + num_new
                if computed // bs > seq.num_registered_blocks:  # a block may have filled
                    bm.register_full_blocks(seq)
            return
        for i, (seq, num_new) in enumerate(zip(out.seqs, out.num_new_tokens)):
            if seq.spec_token_ids:
                num_new = 1 + num_accepted[i]
                seq.spec_token_ids, seq.spec_probs = [], None
                seq.num_computed_tokens += num_new
                seq.num_draft_computed = min(seq.num_draft_computed, seq.num_computed_tokens)
                bm.trim(seq, seq.num_computed_tokens)
            else:
                seq.num_computed_tokens += num_new
            bm.register_full_blocks(seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked sibling joins the running set."""
        self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and return its blocks."""
        self.finish_all([seq])

    def finish_all(self, seqs: list[Sequence]) -> None:
        """Drop finished or aborted sequences and return their blocks, in order; more than a
        few in one pass over the queues (not a scan and a remove each: at 256 running, one
        pass in Python costs about what 4 scans in C do)."""
        if len(seqs) <= 4:
            for seq in seqs:
                if seq in self.running:
                    self.running.remove(seq)
                elif seq in self.waiting:
                    self.waiting.remove(seq)
        else:
            gone = set(seqs)
            running = [s for s in self.running if s not in gone]
            if len(self.running) - len(running) < len(gone):  # (preempted ones wait)
                waiting = [s for s in self.waiting if s not in gone]
                self.waiting.clear()
                self.waiting.extend(waiting)
            self.running[:] = running
        for seq in seqs:
            self.block_manager.free(seq)
