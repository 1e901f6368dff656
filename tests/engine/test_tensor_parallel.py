"""tensor_parallel_size=2 (gloo workers on CPU) against one process: the same greedy tokens for
every family, close logits; bad sizes and a dead worker fail cleanly."""

import os
import signal
import time

import pytest
import torch

from kiln.engine import LLM, SamplingParams
from kiln.engine.config import EngineConfig
from kiln.engine.tp_worker import check_devices
from kiln.errors import ConfigError, InputError, KilnError, WorkerDiedError

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=2)
LENGTHS = (3, 21, 40)  # 40 tokens: a prefill chunked over the 32-token step
ENGINE = dict(device="cpu", max_num_batched_tokens=32)
# as on CUDA: a decode's input token is the previous step's, still on the driver's device
ASYNC = dict(ENGINE, async_scheduling=True)


def _greedy(llm, prompts):
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    llm.engine.block_manager.check_all_free()
    return [o.outputs[0] for o in outs]


def _close_logprobs(a, b):
    """Each step's top logprobs of the two runs agree to float32 noise."""
    for step_a, step_b in zip(a.logprobs, b.logprobs, strict=True):
        assert step_a.keys() == step_b.keys()
        for t in step_a:
            assert abs(step_a[t] - step_b[t]) < 1e-4


# llama_mqa: one KV head, replicated to both ranks (plain llama runs in the tests below);
# gpt2: biases on the row-parallel side, learned positions, LayerNorm
@pytest.mark.parametrize("name", ["llama_mqa", "qwen2", "qwen3", "mistral", "mixtral", "gpt2"])
def test_tp2_greedy_tokens_equal_one_process(hf_model_dir, random_prompts, name):
    path, _ = hf_model_dir(name)
    prompts = random_prompts(LENGTHS, seed=4)
    want = _greedy(LLM(str(path), **ASYNC), prompts)
    llm = LLM(str(path), tensor_parallel_size=2, **ASYNC)
    try:
        got = _greedy(llm, prompts)
    finally:
        llm.engine.core.close()
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for a, b in zip(got, want):
        _close_logprobs(a, b)


def test_tp2_forks_prompt_logprobs_and_embeddings_match_one_process(hf_model_dir, random_prompts):
    path, _ = hf_model_dir("llama")
    tp, one = LLM(str(path), tensor_parallel_size=2, **ENGINE), LLM(str(path), **ENGINE)
    try:
        _check_forks_prompt_logprobs_and_embeddings(tp, one, random_prompts)
    finally:
        tp.engine.core.close()


def _check_forks_prompt_logprobs_and_embeddings(tp, one, random_prompts):
    prompts = random_prompts((13, 6), seed=5)
    # n=3 siblings share the prompt's blocks (copy-on-write copies on every rank's pool)
    params = SamplingParams(n=3, temperature=0.9, seed=7, max_tokens=8, prompt_logprobs=2)
    got, want = (llm.generate(prompt_token_ids=prompts, sampling_params=params)
                 for llm in (tp, one))  # fmt: skip
    for g, w in zip(got, want):
        assert [c.token_ids for c in g.outputs] == [c.token_ids for c in w.outputs]
        for pg, pw in zip(g.prompt_logprobs[1:], w.prompt_logprobs[1:]):
            assert pg.keys() == pw.keys()
            assert all(abs(pg[t] - pw[t]) < 1e-4 for t in pg)
    e_tp, e_one = (llm.embed(prompt_token_ids=prompts) for llm in (tp, one))
    for a, b in zip(e_tp, e_one):
        assert torch.allclose(torch.tensor(a.outputs.embedding), torch.tensor(b.outputs.embedding),
                              atol=1e-5)  # fmt: skip


def test_a_dead_worker_fails_every_request_and_the_engine(hf_model_dir, random_prompts):
    path, _ = hf_model_dir("llama")
    llm = LLM(str(path), tensor_parallel_size=2, **ENGINE)
    prompts = random_prompts((5, 8), seed=6)
    try:
        assert len(_greedy(llm, prompts)) == 2
        (worker,) = llm.engine.core.tp.procs
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(timeout=10)
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match=r"rank 1 .* died \(exit code -9\)"):
            llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
        assert time.monotonic() - start < 10  # no hang
        assert not llm.engine.has_unfinished()  # every request failed, none left behind
        with pytest.raises(WorkerDiedError):  # and it stays failed
            llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    finally:
        llm.engine.core.close()


def test_tp_size_that_does_not_divide_the_heads_names_the_numbers(hf_model_dir):
    path, _ = hf_model_dir("llama")  # 4 query heads, 2 KV heads
    with pytest.raises(ConfigError, match="tensor_parallel_size=3 does not divide "
                                          "num_attention_heads=4"):  # fmt: skip
        LLM(str(path), tensor_parallel_size=3, **ENGINE)


def test_more_ranks_than_devices_is_refused(hf_model_dir, monkeypatch):
    path, _ = hf_model_dir("llama")
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    with pytest.raises(ConfigError, match="tensor_parallel_size=2 needs 2 CPU cores, this host "
                                          "has 1"):  # fmt: skip
        LLM(str(path), tensor_parallel_size=2, **ENGINE)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="needs 2 GPUs, this host has 1"):
        check_devices(2, torch.device("cuda"))


@pytest.mark.parametrize(
    "kw", [dict(enable_lora=True), dict(kv_cache_dtype="int8"), dict(tensor_parallel_size=0)]
)
def test_settings_tp_cannot_run_are_refused(kw):
    with pytest.raises(InputError, match="tensor_parallel_size"):
        EngineConfig(**{"tensor_parallel_size": 2, **kw})


@pytest.mark.gpu
def test_tp2_on_two_gpus_with_cuda_graphs_matches_one_gpu(hf_model_dir, random_prompts):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    path, _ = hf_model_dir("llama")
    prompts = random_prompts(LENGTHS, seed=4)
    args = dict(device="cuda", dtype="float32", max_num_seqs=8)
    want = [o.token_ids for o in _greedy(LLM(str(path), **args), prompts)]
    llm = LLM(str(path), tensor_parallel_size=2, **args)
    try:
        assert llm.engine.runner.graph_runner.graphs  # decode steps replay NCCL in graphs
        assert [o.token_ids for o in _greedy(llm, prompts)] == want
    finally:
        llm.engine.core.close()


def _spawned_children(pid: int) -> list[int]:
    """The multiprocessing spawn children of process `pid` (not its resource tracker)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        kids = [int(k) for k in f.read().split()]
    return [k for k in kids if b"spawn_main" in open(f"/proc/{k}/cmdline", "rb").read()]


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads /proc")
def test_a_dead_worker_stops_the_serving_engine_core(hf_model_dir):
    import asyncio

    from kiln.engine.async_engine import AsyncLLM, EngineDeadError

    path, _ = hf_model_dir("llama")
    llm = AsyncLLM(str(path), tensor_parallel_size=2, max_model_len=128, **ENGINE)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    async def main():
        await llm.start()
        assert len([o async for o in llm.generate([5, 6, 7], params)][-1].outputs[0].token_ids) == 4
        (worker,) = _spawned_children(llm.client.core_pid)
        os.kill(worker, signal.SIGKILL)
        with pytest.raises((EngineDeadError, KilnError), match="died|exited"):
            async for _ in llm.generate([5, 6, 7], params):
                pass
        llm.client.proc.wait(timeout=30)  # the core exits (and says it failed)
        assert llm.client.proc.returncode == 1
        await llm.shutdown(drain=False)

    asyncio.run(main())
