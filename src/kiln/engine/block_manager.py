"""BlockManager: the paged KV pool's bookkeeping (ref counts, prefix hashing, copy-on-write).

The pool holds `num_blocks` blocks of `block_size` token slots. A sequence's `block_table`
lists its blocks in order; slot = block_id * block_size + offset. A full block whose tokens are
computed is registered under hash(parent hash, token ids), so a later prompt with the same
prefix reuses it. Free blocks that still hold a registered prefix stay findable until evicted,
least recently freed first. Sequences forked from one another share blocks (ref_count > 1);
the first write into a shared block copies it (the copy is queued for the model runner).
"""

from __future__ import annotations

from collections import OrderedDict, deque

from kiln.engine.sequence import Sequence
from kiln.engine.state_cache import StateSlots


class Block:
    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # set while registered in the prefix cache
        self.token_ids: tuple[int, ...] = ()


def block_hash(parent: int | None, token_ids: list[int]) -> int:
    return hash((parent, tuple(token_ids)))


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        state_slots: StateSlots | None = None,
    ):
        assert num_blocks > 0 and block_size > 0
        # An SSM model's state slots (kiln.engine.state_cache) go and come with the blocks
        self.state_slots = state_slots
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_uncached: deque[int] = deque(range(num_blocks))
        self.free_cached: OrderedDict[int, None] = OrderedDict()  # LRU: oldest first
        self.hash_to_block: dict[int, int] = {}
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) for copy-on-write
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # of those, found in the cache

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_uncached) + len(self.free_cached)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    # ------------------------------------------------------------------ allocation

    def _take_free(self) -> int:
        if self.free_uncached:
            block_id = self.free_uncached.popleft()
        else:
            block_id, _ = self.free_cached.popitem(last=False)  # evict the LRU cached prefix
            self._unregister(self.blocks[block_id])
        block = self.blocks[block_id]
        assert block.ref_count == 0
        block.ref_count = 1
        return block_id

    def _unregister(self, block: Block) -> None:
        if block.hash is not None and self.hash_to_block.get(block.hash) == block.block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids = None, ()

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        assert block.ref_count > 0, f"double free of block {block_id}"
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.hash is not None:
                self.free_cached[block_id] = None
            else:
                self.free_uncached.append(block_id)

    def _full_block_hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        """Hashes of the first `num_blocks` full blocks of seq.token_ids (cached on seq)."""
        bs = self.block_size
        for i in range(len(seq.block_hashes), num_blocks):
            # the first block's parent is the adapter: its K/V differ from the base model's
            parent = seq.block_hashes[i - 1] if i else seq.cache_salt
            seq.block_hashes.append(block_hash(parent, seq.token_ids[i * bs : (i + 1) * bs]))
        return seq.block_hashes[:num_blocks]

    def match_prefix(self, seq: Sequence) -> None:
        """Give a sequence with no blocks yet the cached blocks of its longest known prefix.

        At least one token is left uncomputed, so the sequence still produces logits.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        self.prefix_cache_queries += len(seq)
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i, h in enumerate(self._full_block_hashes(seq, (len(seq) - 1) // bs)):
            block_id = self.hash_to_block.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.token_ids != tuple(seq.token_ids[i * bs : (i + 1) * bs]):
                break  # a hash collision
            if block.ref_count == 0:
                del self.free_cached[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        seq.num_computed_tokens = seq.num_cached_tokens = len(seq.block_table) * bs
        seq.num_registered_blocks = len(seq.block_table)
        self.prefix_cache_hits += seq.num_cached_tokens

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for seq's next `num_new_tokens` tokens; False (and no change) if the pool
        is short. A shared block about to be written is copied first (copy-on-write)."""
        bs, table = self.block_size, seq.block_table
        start = seq.num_computed_tokens - seq.num_evicted_tokens  # cache index of the next
        if start + num_new_tokens <= len(table) * bs and self.state_slots is None:
            # its own blocks hold the new tokens (most decodes): done, unless the one written
            # is shared
            write_idx = start // bs
            if write_idx == len(table) or self.blocks[table[write_idx]].ref_count == 1:
                return True
        num_new_blocks = -(-(start + num_new_tokens) // bs) - len(table)
        write_idx = start // bs
        cow = write_idx < len(table) and self.blocks[table[write_idx]].ref_count > 1
        if max(num_new_blocks, 0) + cow > self.num_free_blocks:
            return False
        if cow:
            src = table[write_idx]
            dst = self._take_free()
            self._release(src)
            table[write_idx] = dst
            self.pending_copies.append((src, dst))
        for _ in range(num_new_blocks):
            table.append(self._take_free())
        if self.state_slots is not None:
            self.state_slots.hold(seq)
        return True

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child shares parent's blocks (child.block_table is already a copy)."""
        assert child.block_table == parent.block_table
        for block_id in child.block_table:
            self.blocks[block_id].ref_count += 1
        if self.state_slots is not None:
            self.state_slots.fork(parent, child)

    def free(self, seq: Sequence) -> None:
        """Return seq's blocks; the tail goes first so the LRU evicts it before the head."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        if self.state_slots is not None:
            self.state_slots.release(seq)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0
        seq.num_draft_computed = 0
        seq.num_evicted_tokens = 0

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Return seq's blocks past its first `num_tokens` slots (speculative tokens that were
        not proposed or not accepted); they hold nothing registered."""
        keep = -(-num_tokens // self.block_size)
        assert keep >= seq.num_registered_blocks
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())

    def evict(self, seq: Sequence, indices: list[int]) -> None:
        """Drop the full blocks at `indices` (ascending) of seq's block table (KV eviction,
        kiln.engine.kv_eviction): they go back to the pool, or stay with their other holders."""
        assert all(a < b for a, b in zip(indices, indices[1:]))
        num_full = (seq.num_computed_tokens - seq.num_evicted_tokens) // self.block_size
        assert indices and indices[-1] < num_full, "only full, computed blocks are evicted"
        for i in reversed(indices):
            self._release(seq.block_table.pop(i))
        seq.num_evicted_tokens += len(indices) * self.block_size

    def register_full_blocks(self, seq: Sequence) -> None:
        """Enter seq's newly computed full blocks in the prefix cache (a block whose tokens
        are still in flight from the GPU waits for a later call)."""
        if not self.enable_prefix_caching or seq.num_evicted_tokens:
            return  # past an eviction, blocks hold K/V a fresh prefill would not compute
        bs = self.block_size
        num_full = min(seq.num_computed_tokens, len(seq.token_ids)) // bs
        if num_full <= seq.num_registered_blocks:
            return
        hashes = self._full_block_hashes(seq, num_full)
        first_block, seq.num_registered_blocks = seq.num_registered_blocks, num_full
        for i in range(first_block, num_full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and hashes[i] not in self.hash_to_block:
                block.hash = hashes[i]
                block.token_ids = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                self.hash_to_block[hashes[i]] = block.block_id

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (after the model's weights changed, its K/V are stale);
        every block must be free."""
        self.check_all_free()
        for block in self.blocks:
            self._unregister(block)
        self.free_uncached.extend(self.free_cached)
        self.free_cached.clear()

    def check_all_free(self) -> None:
        """Assert that no block is referenced (tests call this once every request is done)."""
        held = [b.block_id for b in self.blocks if b.ref_count]
        assert not held, f"blocks still referenced: {held[:10]}"
        assert self.num_free_blocks == self.num_blocks
