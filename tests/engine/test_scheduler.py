"""Scheduler bookkeeping that the engine tests reach only in passing."""

from kiln.engine.block_manager import BlockManager
from kiln.engine.config import EngineConfig
from kiln.engine.sampling_params import SamplingParams
from kiln.engine.scheduler import Scheduler
from kiln.engine.sequence import Sequence


def _scheduler_with(num_seqs: int) -> tuple[Scheduler, list[Sequence]]:
    """A scheduler running `num_seqs` prompts of different lengths, then the last preempted
    (back in the queue with its blocks freed) and one more waiting."""
    sched = Scheduler(EngineConfig(max_num_seqs=16), BlockManager(64, 4), max_model_len=64)
    seqs = [Sequence(i, str(i), 0, list(range(3 + i)), SamplingParams()) for i in range(num_seqs)]
    for seq in seqs:
        sched.add(seq)
    out = sched.schedule()
    sched.update(out)
    assert sched.running == seqs
    sched._preempt(sched.running.pop())
    late = Sequence(num_seqs, "late", 0, [1, 2], SamplingParams())
    sched.add(late)
    return sched, seqs + [late]


def test_finishing_several_at_once_is_finishing_each():
    """finish_all (one pass over the queues) leaves the queues and the pool as finish on
    each sequence in turn does: running and waiting ones, in their order."""
    states = []
    for batch in (False, True):
        sched, seqs = _scheduler_with(8)
        ended = [seqs[5], seqs[1], seqs[7], seqs[8], seqs[2]]  # 7: preempted, 8: waiting
        if batch:
            sched.finish_all(ended)
        else:
            for seq in ended:
                sched.finish(seq)
        bm = sched.block_manager
        states.append(
            ([s.seq_id for s in sched.running], [s.seq_id for s in sched.waiting],
             list(bm.free_uncached), list(bm.free_cached), [s.block_table for s in seqs])
        )  # fmt: skip
    assert states[1] == states[0]
    assert states[0][0] == [0, 3, 4, 6] and states[0][1] == []


def test_finish_all_of_few():
    sched, seqs = _scheduler_with(4)
    sched.finish_all([])
    assert len(sched.running) == 3 and len(sched.waiting) == 2
    sched.finish_all([seqs[1], seqs[4]])  # one running, one waiting
    assert [s.seq_id for s in sched.running] == [0, 2] and list(sched.waiting) == [seqs[3]]
    assert not seqs[1].block_table


def test_update_registers_each_block_once_its_tokens_are_known():
    """Decode steps with the sampled token read back before the next step (lockstep) or
    one step later (async scheduling: in flight meanwhile): after every update, every full
    block whose tokens the host knows is in the prefix cache, and no other."""
    for in_flight in (False, True):
        sched = Scheduler(EngineConfig(), BlockManager(64, 4), max_model_len=64)
        seq = Sequence(0, "0", 0, list(range(6)), SamplingParams())
        sched.add(seq)
        for token in range(100, 130):
            sched.update(sched.schedule())
            known = min(seq.num_computed_tokens, len(seq.token_ids)) // 4
            assert seq.num_registered_blocks == known
            hashes = sched.block_manager.hash_to_block
            assert [hashes[h] for h in seq.block_hashes[:known]] == seq.block_table[:known]
            if in_flight:  # this step's token flies while the last one's is read
                seq.num_pending += 1
                if token > 100:
                    seq.token_ids.append(token - 1)
                    seq.num_pending -= 1
            else:
                seq.token_ids.append(token)
