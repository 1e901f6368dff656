"""BlockManager invariants: ref counts, prefix hashing, LRU eviction, copy-on-write."""

from kiln.engine.block_manager import BlockManager
from kiln.engine.sampling_params import SamplingParams
from kiln.engine.sequence import Sequence


def _seq(i, tokens):
    return Sequence(i, str(i), 0, tokens, SamplingParams())


def _compute(bm, seq):
    assert bm.allocate(seq, seq.num_uncomputed_tokens)
    seq.num_computed_tokens = len(seq)
    bm.register_full_blocks(seq)


def test_prefix_hit_reuses_blocks_and_leaves_one_token():
    bm = BlockManager(8, 4)
    a = _seq(0, list(range(12)))
    bm.match_prefix(a)
    _compute(bm, a)
    b = _seq(1, list(range(12)))
    bm.match_prefix(b)
    assert b.block_table == a.block_table[:2]  # the last block is recomputed: logits needed
    assert b.num_computed_tokens == 8 and bm.prefix_cache_hits == 8
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    bm.free(a)
    bm.free(b)
    bm.check_all_free()


def test_freed_prefix_stays_cached_until_evicted():
    bm = BlockManager(4, 4)
    a = _seq(0, list(range(9)))
    bm.match_prefix(a)
    _compute(bm, a)
    bm.free(a)
    c = _seq(1, list(range(9)))
    bm.match_prefix(c)
    assert c.num_cached_tokens == 8
    bm.free(c)
    other = _seq(2, [100 + i for i in range(16)])  # needs every block: evicts the prefix
    bm.match_prefix(other)
    assert bm.allocate(other, 16)
    bm.free(other)
    d = _seq(3, list(range(9)))
    bm.match_prefix(d)
    assert d.num_cached_tokens == 0
    bm.free(d)
    bm.check_all_free()


def test_fork_shares_blocks_and_copies_on_write():
    bm = BlockManager(8, 4)
    a = _seq(0, list(range(6)))
    bm.match_prefix(a)
    _compute(bm, a)
    b = a.fork(1, 1)
    bm.fork(a, b)
    a.token_ids.append(50)
    b.token_ids.append(60)
    assert bm.allocate(a, 1)
    assert bm.take_copies() == [(b.block_table[1], a.block_table[1])]
    assert a.block_table[0] == b.block_table[0] and a.block_table[1] != b.block_table[1]
    assert bm.allocate(b, 1) and bm.take_copies() == []  # b now owns the original alone
    bm.free(a)
    bm.free(b)
    bm.check_all_free()


def test_allocate_fails_without_side_effects():
    bm = BlockManager(2, 4)
    a = _seq(0, list(range(12)))
    bm.match_prefix(a)
    assert not bm.allocate(a, 12)
    assert a.block_table == [] and bm.num_free_blocks == 2


def test_decode_takes_a_block_only_past_the_last_ones_room():
    bm = BlockManager(4, 4)
    a = _seq(0, list(range(7)))
    _compute(bm, a)
    table, free = list(a.block_table), bm.num_free_blocks
    a.token_ids.append(7)
    assert bm.allocate(a, 1) and a.block_table == table and bm.num_free_blocks == free
    a.num_computed_tokens = 8
    assert bm.allocate(a, 0) and a.block_table == table  # a full last block, nothing new
    a.token_ids.append(8)
    assert bm.allocate(a, 1) and len(a.block_table) == 3 and bm.num_free_blocks == free - 1
    assert bm.take_copies() == []
    bm.free(a)
    bm.check_all_free()
