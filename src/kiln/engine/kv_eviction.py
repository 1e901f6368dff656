"""KV eviction: each sequence keeps at most kv_budget tokens of K/V, whole blocks at a time.

Eviction is block-granular so that it fits the paged pool: an evicted block goes back to the
pool, and the sequence's block table simply lists the blocks it kept, in order. The kernels
need no change: a sequence's cache is its kept tokens in order (cache index c = the c-th kept
token), `context_lens` counts kept tokens and causality holds in cache order.

Policies (kv_eviction):
- "streaming" (StreamingLLM, Xiao et al. 2023): the first num_sink_tokens (the attention
  sinks, rounded up to whole blocks) and the most recent blocks; the oldest others go first.
- "h2o" (Zhang et al. 2023): the sinks, a recent window (half of the blocks past the sinks)
  and the heavy hitters: the blocks with the most attention mass (every layer's and head's
  probabilities, summed per slot by the attention ops into the pool's `scores`); the lightest
  go first. The mass is that of the sequence's last step's queries (the decoded token, or
  the prefill chunk): the model runner zeroes the step's sequences' slots before the step,
  as TOVA (Oren et al. 2024, "Transformers are Multi-State RNNs") scores keys by the current
  query's attention. H2O's own score, the mass accumulated since a key was stored, favors
  the oldest keys (more queries saw them) and, once a block is kept, it keeps gathering mass
  that a newer block cannot catch up with: on kv_quality.py's CPU char model the heavy
  hitters froze on stale text and h2o fell behind streaming (perplexity +2.54% vs +1.50% at
  10% of the context); scored by the last step it is +1.45%, but still behind at 20% and 50%
  (+0.27% / +0.10% vs +0.15% / -0.03%), where that model reads only recent text.
  A block shared by sequences (a fork, a prefix hit) holds the mass of the last step that
  ran any of them.

When: before a step stores a sequence's new tokens, blocks are evicted so that its blocks, new
tokens included, number at most ceil(kv_budget / block_size) (the budget is rounded up to
whole blocks). Only full blocks outside the sinks (and h2o's recent window) are candidates,
so a step whose tokens do not fit even then (a prefill chunk longer than the budget) stores
them all and the next step evicts. A sequence under its budget is never touched: its greedy
tokens are those of the full cache until it reaches the budget.

Positions: RoPE positions stay the tokens' positions in the text. StreamingLLM re-assigns
positions within the cache so that a model can run past its trained context; kiln never runs
past max_model_len (at most the model's context), so every original position is one the
model was trained on, and keeping them spares re-rotating the cached keys (RoPE is applied
before the store, and a quantized key would round again).

Prefix caching: blocks are registered in the prefix cache only until a sequence's first
eviction; blocks computed after it hold K/V that attended to an evicted cache, which a fresh
prefill would not compute, so they are never shared. Preemption frees a sequence's blocks
and its evictions: it is recomputed from its tokens. Sliding-window models are refused here
(make_evictor), beam search where requests are checked (kiln.engine.llm_engine.check_params).

Cost: streaming reads nothing from the device. H2O's attention ops make a second pass over
the keys (decode with one split: the mass needs each row's final softmax sums), each step
first zeroes its sequences' slots of the mass, and the evictions read the candidate blocks'
mass, so an h2o engine runs lockstep (no async
scheduling).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from kiln.config import ModelConfig
from kiln.engine.block_manager import BlockManager
from kiln.engine.config import EngineConfig
from kiln.engine.sequence import Sequence
from kiln.errors import ConfigError

log = logging.getLogger("kiln.engine")


def make_evictor(config: EngineConfig, block_manager: BlockManager, kv_cache, model: ModelConfig):
    """The engine's KVEvictor (None for kv_eviction "none"), its policy in the log; h2o's
    attention mass lives in kv_cache.scores (the runner makes it before its CUDA graphs)."""
    if config.kv_eviction == "none":
        log.info("KV eviction: none")
        return None
    if any(w is not None for w in model.sliding_windows):
        raise ConfigError(
            f"kv_eviction={config.kv_eviction!r} does not combine with sliding-window attention "
            "(its window counts positions, an evicted cache does not hold them all)"
        )
    scores = None
    if config.kv_eviction == "h2o":
        assert kv_cache.scores is not None
        scores = kv_cache.block_scores
    evictor = KVEvictor(config, block_manager, scores)
    log.info(
        "KV eviction: %s, budget %d tokens per sequence (%d blocks; %d sink, %d recent-only)",
        config.kv_eviction, config.kv_budget, evictor.max_blocks, evictor.sink_blocks,
        evictor.recent_blocks,
    )  # fmt: skip
    return evictor


class KVEvictor:
    """Makes room within a sequence's budget before the scheduler allocates its new tokens.

    block_scores (h2o): the accumulated attention mass of the given pool blocks, as floats.
    """

    def __init__(
        self,
        config: EngineConfig,
        block_manager: BlockManager,
        block_scores: Callable[[list[int]], list[float]] | None = None,
    ):
        assert config.kv_eviction in ("streaming", "h2o") and config.kv_budget is not None
        assert config.kv_eviction == "streaming" or block_scores is not None
        bs = self.block_size = config.block_size
        self.policy = config.kv_eviction
        self.block_manager = block_manager
        self.block_scores = block_scores
        self.max_blocks = -(-config.kv_budget // bs)
        self.sink_blocks = -(-config.num_sink_tokens // bs)
        self.recent_blocks = (
            (self.max_blocks - self.sink_blocks) // 2 if self.policy == "h2o" else 0
        )
        self.num_evicted_blocks = 0  # over the engine's life

    def make_room(self, seq: Sequence, num_new: int) -> None:
        """Evict seq's blocks so that, with num_new more tokens, it holds at most the budget's
        blocks (as many as the candidates allow)."""
        bs = self.block_size
        cached = seq.num_computed_tokens - seq.num_evicted_tokens  # tokens in the pool
        excess = -(-(cached + num_new) // bs) - self.max_blocks
        if excess <= 0:
            return
        # full blocks past the sinks, before the recent window (the block being written and
        # those the new tokens open are not in the table's full part)
        candidates = list(range(self.sink_blocks, cached // bs - self.recent_blocks))
        if not candidates:
            return
        n = min(excess, len(candidates))
        if self.policy == "streaming":
            victims = candidates[:n]
        else:
            mass = self.block_scores([seq.block_table[i] for i in candidates])
            ranked = sorted(zip(mass, candidates))  # lightest first; ties: the oldest
            victims = sorted(i for _, i in ranked[:n])
        self.block_manager.evict(seq, victims)
        self.num_evicted_blocks += n
