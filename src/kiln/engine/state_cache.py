"""The SSM state cache: each running sequence's conv + SSM state, beside the paged KV pool.

An SSM layer (kiln.model.ssm) keeps a fixed-size state per sequence instead of K/V per token.
The pool holds one slot per sequence the scheduler may run (max_num_seqs); the BlockManager
hands a slot out with a sequence's first blocks and takes it back with them (finish, abort,
preemption), so a preempted sequence is recomputed from a zero state when it resumes, like
its K/V. A forked sibling (n / best_of) gets its own slot, a copy of its parent's state.
"""

from __future__ import annotations

import torch

from kiln.engine.attention import PagedBackend
from kiln.engine.sequence import Sequence
from kiln.model.ssm import SSMStateCache


class StateSlots:
    """Host bookkeeping of the state pool's slots: which sequence holds which."""

    def __init__(self, num_slots: int):
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.slot_of: dict[int, int] = {}  # seq_id -> slot
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) for forks

    def hold(self, seq: Sequence) -> None:
        """Give seq a slot if it has none (there is one per schedulable sequence)."""
        if seq.seq_id not in self.slot_of:
            assert self.free_slots, "more running sequences than state slots"
            self.slot_of[seq.seq_id] = self.free_slots.pop()

    def release(self, seq: Sequence) -> None:
        slot = self.slot_of.pop(seq.seq_id, None)
        if slot is not None:
            self.free_slots.append(slot)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        self.hold(child)
        self.pending_copies.append((self.slot_of[parent.seq_id], self.slot_of[child.seq_id]))

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies


class SSMBackend(PagedBackend):
    """PagedBackend for the attention layers, plus each SSM layer's state (`ssm_states`)."""

    def __init__(self, kv_cache, ops, pool: SSMStateCache, slots: StateSlots):
        super().__init__(kv_cache, ops)
        self.pool, self.slots = pool, slots
        self.step: tuple | None = None  # (slots, has_state, cu_seqlens, decode) of this step

    def stage(self, seqs: list[Sequence], first_positions: list[int], device) -> None:
        """This step's rows: seqs[r] brings tokens from first_positions[r] on (0: no state)."""
        for src, dst in self.slots.take_copies():
            self.pool.copy(src, dst)
        idx = torch.tensor([self.slots.slot_of[s.seq_id] for s in seqs], device=device)
        has = torch.tensor([p > 0 for p in first_positions], device=device)
        self.step = (idx, has, all(p > 0 for p in first_positions))

    def ssm_states(self, layer_idx: int):
        idx, has, every_row_has_state = self.step
        md = self.metadata
        decode = every_row_has_state and md.num_decodes == len(md.query_lens)
        return self.pool.view(layer_idx, idx, has, md.cu_seqlens_q.long(), decode)
