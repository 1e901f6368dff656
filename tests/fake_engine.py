"""An idle stand-in for AsyncLLM: enough for routes and /metrics that never reach the engine."""

from kiln.engine.config import EngineConfig

# every key the engine's stats() has when nothing runs (kiln.engine.core.EngineCore.stats)
IDLE_STATS = dict(num_running=0, num_waiting=0, kv_cache_usage=0.0, num_free_blocks=1,
                  num_total_blocks=1, prefix_cache_hits=0, prefix_cache_queries=0,
                  prompt_tokens_total=0, generation_tokens_total=0, kv_pool_tokens=16,
                  kv_blocks_per_seq_mean=0.0, kv_blocks_per_seq_max=0,
                  kv_evicted_blocks_total=0)  # fmt: skip


class IdleEngine:
    config = EngineConfig(max_num_seqs=4)
    tokenizer = None
    max_model_len = 16
    is_running = True

    def stats(self) -> dict:
        return dict(IDLE_STATS)

    async def start(self) -> None:
        pass

    async def shutdown(self, drain=True, timeout=None) -> None:
        pass
