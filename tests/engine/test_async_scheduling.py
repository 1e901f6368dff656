"""Async scheduling (step N+1 queued before step N's tokens are read) changes no output.

On CPU the forward runs synchronously, so these tests check the bookkeeping: tokens in flight,
inputs read from the previous step's samples, one-step-late stops, aborts and preemptions with
a token in flight, and the fall back to lockstep for requests that need it.
"""

import pytest

from kiln.engine import LLM, SamplingParams
from kiln.engine.llm_engine import LLMEngine

GREEDY = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)


def _run(path, prompts, params=GREEDY, **engine_args):
    llm = LLM(str(path), device="cpu", **engine_args)
    out = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    llm.engine.block_manager.check_all_free()
    assert llm.engine.core._inflight is None or not llm.engine.has_unfinished()
    return llm, [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in out]


@pytest.mark.parametrize(
    "engine_args",
    [
        {},
        {"max_num_batched_tokens": 7},  # chunked prefill: chunks that do and do not sample
        {"num_kv_blocks": 6, "max_model_len": 96},  # preemption with tokens in flight
        {"enable_prefix_caching": False},
    ],
    ids=["plain", "chunked", "preempt", "no-prefix-cache"],
)
def test_async_gives_the_same_tokens(hf_model_dir, random_prompts, engine_args):
    path, _ = hf_model_dir("qwen3")
    prompts = random_prompts((33, 7, 50, 16), seed=3)
    params = [
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (40, 1, 40, 30)
    ]
    _, sync = _run(path, prompts, params, async_scheduling=False, **engine_args)
    llm, overlapped = _run(path, prompts, params, async_scheduling=True, **engine_args)
    assert overlapped == sync
    if "num_kv_blocks" in engine_args:
        assert llm.engine.scheduler.num_preemptions > 0


def test_lockstep_and_async_run_the_same_runner_entry(hf_model_dir, random_prompts):
    """Both modes queue every step through ModelRunner.execute (lockstep then waits for its
    tokens); the runner has no other entry, and the greedy tokens agree."""
    from kiln.engine.model_runner import ModelRunner

    path, _ = hf_model_dir("qwen3")
    prompts = random_prompts((21, 5, 12), seed=8)
    entries = {name for name in vars(ModelRunner) if not name.startswith("_")}
    assert entries == {"execute", "prepare"}
    runs, calls = [], []
    for async_scheduling in (False, True):
        llm = LLM(str(path), device="cpu", async_scheduling=async_scheduling)
        execute, n = llm.engine.runner.execute, []

        def counted(*args, execute=execute, n=n, **kwargs):
            n.append(1)
            return execute(*args, **kwargs)

        llm.engine.runner.execute = counted
        out = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
        runs.append([o.outputs[0].token_ids for o in out])
        calls.append(len(n))
    assert runs[1] == runs[0]
    assert calls[0] >= GREEDY.max_tokens and calls[1] >= GREEDY.max_tokens


def test_async_stops_one_step_late_without_showing_it(model_with_tokenizer, random_prompts):
    path, _ = model_with_tokenizer
    p = random_prompts((9,), seed=9)[0]
    _, (free,) = _run(path, [p], async_scheduling=False)
    first = free[0][0]
    for params in [
        SamplingParams(temperature=0, max_tokens=14, stop_token_ids=[free[0][5]]),
        SamplingParams(temperature=0, max_tokens=14, stop_token_ids=[first], min_tokens=4),
    ]:
        _, sync = _run(path, [p], params, async_scheduling=False)
        _, overlapped = _run(path, [p], params, async_scheduling=True)
        assert overlapped == sync and sync[0][1] == "stop"
    # stop strings: the text is cut the same way, and never shows the stop
    llm = LLM(str(path), device="cpu", async_scheduling=True)
    full = llm.generate(prompt_token_ids=[p], sampling_params=GREEDY)[0].outputs[0].text
    stop = full[6:9]
    params = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, stop=[stop])
    comp = llm.generate(prompt_token_ids=[p], sampling_params=params)[0].outputs[0]
    assert comp.text == full[: full.index(stop)] and comp.finish_reason == "stop"
    llm.engine.block_manager.check_all_free()


def test_abort_with_a_token_in_flight(hf_model_dir, random_prompts):
    path, _ = hf_model_dir("llama")
    prompts = random_prompts((12, 20, 5), seed=6)
    _, ref = _run(path, prompts, async_scheduling=False)
    engine = LLMEngine(str(path), device="cpu", async_scheduling=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), params=GREEDY, prompt_token_ids=p)
    finished = {}
    for _ in range(4):
        for out in engine.step():
            assert not out.finished
    assert engine.core._inflight is not None
    aborted = engine.abort("1")
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    while engine.has_unfinished():
        for out in engine.step(stream=False):
            finished[out.request_id] = out.outputs[0].token_ids
    assert finished == {"0": ref[0][0], "2": ref[2][0]}
    assert ref[1][0][: len(aborted.outputs[0].token_ids)] == aborted.outputs[0].token_ids
    engine.block_manager.check_all_free()


def test_lockstep_requests_join_and_leave_an_async_engine(hf_model_dir, random_prompts):
    """A penalty or n > 1 request drains the pipeline and runs lockstep; tokens unchanged."""
    path, _ = hf_model_dir("llama")
    prompts = random_prompts((12, 20, 5), seed=7)
    penalty = SamplingParams(temperature=0.0, max_tokens=6, repetition_penalty=1.3, ignore_eos=True)
    pair = SamplingParams(temperature=0.0, n=2, max_tokens=9, ignore_eos=True)
    params = [GREEDY, penalty, pair]
    _, sync = _run(path, prompts, params, async_scheduling=False)
    engine = LLMEngine(str(path), device="cpu", async_scheduling=True)
    engine.add_request("0", params=GREEDY, prompt_token_ids=prompts[0])
    outs = {}
    for step in range(200):
        if step == 3:
            engine.add_request("1", params=penalty, prompt_token_ids=prompts[1])
        if step == 12:
            engine.add_request("2", params=pair, prompt_token_ids=prompts[2])
        for out in engine.step(stream=False):
            outs[out.request_id] = out
        if step > 12 and not engine.has_unfinished():
            break
    got = [(outs[r].outputs[0].token_ids, outs[r].outputs[0].finish_reason) for r in "012"]
    assert got == sync
    assert len(outs["2"].outputs) == 2
    assert outs["2"].outputs[0].token_ids == outs["2"].outputs[1].token_ids
    engine.block_manager.check_all_free()


def test_seeded_sampling_is_reproducible_with_async(hf_model_dir, random_prompts):
    path, _ = hf_model_dir("llama")
    p = random_prompts((10,), seed=4)[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    _, sync = _run(path, [p], seeded, async_scheduling=False)
    _, overlapped = _run(path, [p], seeded, async_scheduling=True)
    assert overlapped == sync
