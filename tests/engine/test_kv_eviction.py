"""KV eviction (streaming, h2o) under a per-sequence budget: untouched under budget, bounded
above it, no leaked blocks, the policies' choices, and the refusals."""

import pytest
import torch

from kiln.engine import LLM, SamplingParams
from kiln.engine.block_manager import BlockManager
from kiln.engine.config import EngineConfig
from kiln.engine.core import EngineCore
from kiln.engine.kv_eviction import KVEvictor
from kiln.engine.sequence import Sequence
from kiln.errors import ConfigError, InputError

BS = 4  # small blocks: evictions after a few tokens
# Where the Triton kernels run in these tests: the interpreter on CPU, else the GPU (float32).
TRITON_DEVICE = (
    dict(device="cpu") if not torch.cuda.is_available() else dict(device="cuda", dtype="float32")
)
POLICIES = ["streaming", "h2o"]


def _params(n):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def _run(path, prompts, params, **engine_args):
    engine_args.setdefault("device", "cpu")
    llm = LLM(str(path), block_size=BS, **engine_args)
    out = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    llm.engine.block_manager.check_all_free()
    return llm, [o.outputs[0].token_ids for o in out]


@pytest.fixture(scope="module")
def full(hf_model_dir, random_prompts):
    """The tiny qwen3, prompts, and greedy tokens with the full cache."""
    path, _ = hf_model_dir("qwen3")
    prompts = random_prompts((10, 17, 6), seed=5)
    _, tokens = _run(path, prompts, _params(40))
    return path, prompts, tokens


@pytest.mark.parametrize("policy", POLICIES)
def test_under_budget_nothing_changes(full, policy):
    path, prompts, want = full
    llm, got = _run(path, prompts, _params(40), kv_eviction=policy, kv_budget=64)
    assert got == want
    assert llm.engine.core.stats()["kv_evicted_blocks_total"] == 0


@pytest.mark.parametrize("policy", POLICIES)
def test_greedy_equals_full_cache_until_the_budget_is_reached(full, policy):
    """Tokens computed while the cache held at most the budget equal the full cache's; then
    blocks are evicted, and the outputs may part."""
    path, prompts, want = full
    budget = 24  # 6 blocks of 4
    llm, got = _run(path, prompts, _params(40), kv_eviction=policy, kv_budget=budget)
    for p, g, w in zip(prompts, got, want):
        same = budget - len(p) + 1  # the tokens sampled from a cache of <= budget tokens
        assert g[:same] == w[:same]
    assert llm.engine.core.stats()["kv_evicted_blocks_total"] > 0


@pytest.mark.parametrize("policy", POLICIES)
def test_sequences_never_hold_more_than_the_budget(full, policy):
    path, prompts, _ = full
    core = EngineCore(str(path), device="cpu", block_size=BS, kv_eviction=policy, kv_budget=22)
    for i, p in enumerate(prompts):
        core.add_request(str(i), p, _params(50))
    most = 0
    while core.has_work():
        core.step()
        most = max(most, core.stats()["kv_blocks_per_seq_max"])
    assert most == 6  # ceil(22 / 4): the budget in whole blocks
    core.block_manager.check_all_free()
    assert core.stats()["kv_evicted_blocks_total"] > 0


@pytest.mark.parametrize("policy", POLICIES)
def test_no_blocks_leak_after_eviction_preemption_and_abort(full, policy):
    """A pool too small for every sequence at once (preemptions), evictions, and an abort
    mid-generation: every block comes back."""
    path, prompts, _ = full
    core = EngineCore(
        str(path), device="cpu", block_size=BS, kv_eviction=policy, kv_budget=20,
        max_model_len=100, num_kv_blocks=25, max_num_seqs=8,
    )  # fmt: skip
    for i in range(8):
        core.add_request(str(i), prompts[i % 3] + [i + 3], _params(60))
    for _ in range(30):
        core.step()
    assert core.scheduler.num_preemptions > 0
    core.abort("3")
    while core.has_work():
        core.step()
    core.block_manager.check_all_free()


def test_prefix_cache_with_eviction_gives_the_same_tokens_again(full):
    """Blocks are registered only before a sequence's first eviction: a second run of the
    same prompts reuses them and computes the same tokens."""
    path, prompts, _ = full
    llm = LLM(str(path), device="cpu", block_size=BS, kv_eviction="h2o", kv_budget=20)
    first = llm.generate(prompt_token_ids=prompts, sampling_params=_params(30))
    again = llm.generate(prompt_token_ids=prompts, sampling_params=_params(30))
    assert llm.engine.block_manager.prefix_cache_hits > 0
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in first]
    llm.engine.block_manager.check_all_free()


@pytest.mark.parametrize("policy", POLICIES)
def test_triton_kernels_evict_like_the_reference(hf_model_dir, random_prompts, policy):
    path, _ = hf_model_dir("llama")
    prompts = random_prompts((9, 14), seed=6)
    args = dict(kv_eviction=policy, kv_budget=16, async_scheduling=False, **TRITON_DEVICE)
    _, ref = _run(path, prompts, _params(20), attention_backend="torch", **args)
    _, got = _run(path, prompts, _params(20), attention_backend="triton", **args)
    assert got == ref


def _seq(num_tokens, num_blocks, bm):
    seq = Sequence(0, "r", 0, list(range(num_tokens)), _params(1))
    assert bm.allocate(seq, num_tokens)
    seq.num_computed_tokens = num_tokens
    assert len(seq.block_table) == num_blocks
    return seq


def test_streaming_keeps_the_sinks_and_the_newest_blocks():
    cfg = EngineConfig(block_size=4, kv_eviction="streaming", kv_budget=20, num_sink_tokens=4)
    bm = BlockManager(32, 4, enable_prefix_caching=False)
    seq = _seq(20, 5, bm)  # 5 full blocks: the budget
    table = list(seq.block_table)
    KVEvictor(cfg, bm).make_room(seq, 1)  # a 21st token needs a 6th block: one goes
    assert seq.block_table == [table[0], *table[2:]] and seq.num_evicted_tokens == 4
    assert bm.num_free_blocks == 32 - 4


def test_h2o_keeps_the_sinks_the_recent_window_and_the_heavy_blocks():
    cfg = EngineConfig(block_size=4, kv_eviction="h2o", kv_budget=32, num_sink_tokens=4)
    bm = BlockManager(32, 4, enable_prefix_caching=False)
    seq = _seq(32, 8, bm)  # 8 full blocks; sinks: 1, recent window: (8 - 1) // 2 = 3
    table = list(seq.block_table)
    mass = dict(zip(table, [0.0, 5.0, 1.0, 9.0, 2.0, 0.0, 0.0, 0.0]))
    evictor = KVEvictor(cfg, bm, lambda blocks: [mass[b] for b in blocks])
    evictor.make_room(seq, 5)  # 37 tokens: 10 blocks, 2 over
    assert seq.block_table == [table[0], table[1], table[3], *table[5:]]  # 2 and 4: lightest
    assert seq.num_evicted_tokens == 8 and evictor.num_evicted_blocks == 2


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_h2o_scores_the_last_steps_attention(hf_model_dir, random_prompts, backend):
    """A sequence's blocks hold the attention mass of its last step's queries only (TOVA's
    score, kiln.engine.kv_eviction): every query's probabilities sum to one per layer and head,
    so its slots sum to layers x heads x the step's tokens, not to the mass of every earlier
    step as well (an accumulated score favors the oldest blocks)."""
    path, _ = hf_model_dir("llama")
    prompts = random_prompts((37, 9), seed=7)
    args = TRITON_DEVICE if backend == "triton" else dict(device="cpu")
    core = EngineCore(
        str(path), block_size=BS, kv_eviction="h2o", kv_budget=24, attention_backend=backend,
        max_num_batched_tokens=10, **args,
    )  # fmt: skip
    for i, p in enumerate(prompts):
        core.add_request(str(i), p, _params(12))
    cfg, scores = core.model_config, core.runner.kv_cache.scores
    steps = 0
    while core.has_work():
        sched = core.scheduler
        before = {s.seq_id: s.num_computed_tokens for s in [*sched.running, *sched.waiting]}
        core.step()
        for seq in sched.running:
            if n := seq.num_computed_tokens - before[seq.seq_id]:  # the step's queries
                mass = scores[torch.tensor(seq.block_table)].sum().item()
                assert mass == pytest.approx(cfg.num_layers * cfg.num_heads * n, rel=1e-4)
                steps += 1
    assert steps > 10 and core.stats()["kv_evicted_blocks_total"] > 0
    core.block_manager.check_all_free()


def test_bad_eviction_settings_are_one_line_errors(hf_model_dir):
    with pytest.raises(InputError, match="kv_budget >= num_sink_tokens \\+ block_size = 20"):
        EngineConfig(kv_eviction="streaming", kv_budget=19)
    with pytest.raises(InputError, match="kv_budget needs kv_eviction"):
        EngineConfig(kv_budget=64)
    with pytest.raises(InputError, match="kv_eviction must be"):
        EngineConfig(kv_eviction="lru", kv_budget=64)
    path, _ = hf_model_dir("mistral")  # sliding window
    with pytest.raises(ConfigError, match="sliding-window"):
        LLM(str(path), device="cpu", kv_eviction="h2o", kv_budget=64)


def test_beam_search_with_eviction_is_refused(full):
    path, prompts, _ = full
    llm = LLM(str(path), device="cpu", kv_eviction="streaming", kv_budget=64)
    beam = SamplingParams(n=2, use_beam_search=True, temperature=0.0, max_tokens=4)
    with pytest.raises(InputError, match="use_beam_search"):
        llm.generate(prompt_token_ids=prompts[:1], sampling_params=beam)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_h2o_on_cuda_with_graphs_is_untouched_under_budget(
    hf_model_dir, random_prompts, kv_cache_dtype
):
    """Triton kernels, CUDA graphs (decode and mixed) and the attention-mass pass on a GPU:
    under budget the tokens are the plain engine's; over it every block still comes back."""
    path, _ = hf_model_dir("qwen3")
    prompts = random_prompts((10, 17, 6), seed=5)
    # A fixed pool: three engines live at once in this test (and others before it in the
    # process), so a fraction of the free memory could leave the last one no blocks.
    args = dict(device="cuda", dtype="bfloat16", block_size=16, kv_cache_dtype=kv_cache_dtype,
                kv_cache_memory_bytes=2**26)  # fmt: skip
    params = _params(40)
    plain = LLM(str(path), **args).generate(prompt_token_ids=prompts, sampling_params=params)
    llm = LLM(str(path), kv_eviction="h2o", kv_budget=128, **args)
    under = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    assert [o.outputs[0].token_ids for o in under] == [o.outputs[0].token_ids for o in plain]
    llm = LLM(str(path), kv_eviction="h2o", kv_budget=36, **args)
    llm.generate(prompt_token_ids=prompts, sampling_params=_params(120))
    assert llm.engine.core.stats()["kv_evicted_blocks_total"] > 0
    llm.engine.block_manager.check_all_free()
