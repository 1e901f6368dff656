"""Scheduler: who runs this step, and how many of their tokens.

Continuous batching, vLLM-v1 style: every sequence has `num_computed_tokens` of its tokens in
the KV pool, and a step computes some of the rest. Running sequences go first (a decode is just
one uncomputed token), then waiting ones in arrival order, all under one per-step token budget;
a prompt longer than what is left of the budget is cut into chunks (chunked prefill). When the
pool runs out, the most recently admitted running sequence is preempted: its blocks are freed
and it goes back to the head of the queue, to be recomputed later (prefix hits make that cheap).
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
    fresh_blocks: list[int] = field(default_factory=list)  # newly handed out (H2O resets them)
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

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_pending and seq.reaches_limit(self.max_model_len):
                i += 1  # finishes when its token in flight arrives
                continue
            num_new = min(seq.num_uncomputed_tokens, budget)
            self._make_room(seq, num_new)
            while not bm.allocate(seq, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                out.num_preempted += 1
                if victim is seq:
                    break
            else:
                out.seqs.append(seq)
                out.num_new_tokens.append(num_new)
                budget -= num_new
                i += 1
        if not out.num_preempted:
            self._admit_waiting(out, budget)
        out.block_copies = bm.take_copies()
        out.fresh_blocks = bm.take_fresh()
        return out

    def _make_room(self, seq: Sequence, num_new: int) -> None:
        if self.evictor is not None:
            self.evictor.make_room(seq, num_new)

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        bm = self.block_manager
        num_seqs = len(self.running)
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if num_seqs + 1 + seq.pending_forks > self.config.max_num_seqs:
                break
            if not seq.block_table:
                bm.match_prefix(seq)
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
            budget -= num_new
            num_seqs += 1 + seq.pending_forks

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.block_manager.free(seq)
        seq.num_cached_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def update(self, out: SchedulerOutput) -> None:
        """Advance the computed counts after the model ran; register newly full blocks."""
        for seq, num_new in zip(out.seqs, out.num_new_tokens):
            seq.num_computed_tokens += num_new
            self.block_manager.register_full_blocks(seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked sibling joins the running set."""
        self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and return its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
