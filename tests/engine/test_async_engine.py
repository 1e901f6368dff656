"""AsyncLLM (the engine core in its own process): streamed outputs of each kind, abort on
leaving the iterator, stats, the core dying."""

import asyncio
import os
import signal

import pytest

from kiln.engine import SamplingParams
from kiln.engine.async_engine import AsyncLLM, EngineDeadError
from kiln.engine.sampling_params import RequestOutputKind
from kiln.errors import InputError


@pytest.mark.parametrize("overlap", [False, True], ids=["lockstep", "async-scheduling"])
def test_stream_is_cumulative_and_abort_frees_blocks(hf_model_dir, random_prompts, overlap):
    path, _ = hf_model_dir("llama")
    llm = AsyncLLM(str(path), device="cpu", max_model_len=128, async_scheduling=overlap)
    p, q = random_prompts((7, 12), seed=20)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

    async def full():
        outs = [o async for o in llm.generate(p, params, "full")]
        return outs

    async def broken():
        n = 0
        async for _ in llm.generate(q, SamplingParams(max_tokens=100, ignore_eos=True), "b"):
            n += 1
            if n == 3:
                break
        return n

    async def main():
        await llm.start()
        outs, n = await asyncio.gather(full(), broken())
        with pytest.raises(InputError, match="max_model_len is 128"):
            async for _ in llm.generate([5] * 200, params):
                pass
        for _ in range(100):  # the abort lands on the loop thread
            if llm.stats()["num_running"] == 0 and llm.stats()["kv_cache_usage"] == 0:
                break
            await asyncio.sleep(0.02)
        stats = llm.stats()
        await llm.shutdown()
        return outs, n, stats

    outs, n, stats = asyncio.run(main())
    assert n == 3
    lens = [len(o.outputs[0].token_ids) for o in outs]
    assert lens == sorted(lens) and lens[-1] == 10 and outs[-1].finished
    assert not any(o.finished for o in outs[:-1])
    assert outs[-1].outputs[0].token_ids[: lens[0]] == outs[0].outputs[0].token_ids
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert stats["kv_cache_usage"] == 0
    assert set(stats) >= {
        "num_free_blocks",
        "num_total_blocks",
        "prefix_cache_hits",
        "prefix_cache_queries",
        "prompt_tokens_total",
        "generation_tokens_total",
    }
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


def test_slow_consumer_gets_merged_deltas_and_the_same_tokens(hf_model_dir, random_prompts):
    path, _ = hf_model_dir("llama")
    llm = AsyncLLM(str(path), device="cpu", max_model_len=128)
    (p,) = random_prompts((7,), seed=21)
    kinds = (RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA)
    params = {k: SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, output_kind=k)
              for k in kinds}  # fmt: skip

    async def collect(kind, delay):
        outs = []
        async for o in llm.generate(p, params[kind]):
            outs.append(o)
            await asyncio.sleep(delay)
        return outs

    async def main():
        await llm.start()
        res = await asyncio.gather(collect(kinds[0], 0), collect(kinds[1], 0.2))
        await llm.shutdown()
        return res

    cumulative, delta = asyncio.run(main())
    ids = cumulative[-1].outputs[0].token_ids
    assert len(ids) == 24
    assert [t for o in delta for t in o.outputs[0].token_ids] == ids
    assert len(delta) < len(cumulative)  # a slow reader takes several steps at once
    assert delta[-1].finished and delta[-1].outputs[0].finish_reason == "length"


def test_engine_core_death_fails_requests_and_is_reported(hf_model_dir, random_prompts):
    path, _ = hf_model_dir("llama")
    llm = AsyncLLM(str(path), device="cpu", max_model_len=128)
    (p,) = random_prompts((7,), seed=22)
    deaths = []
    llm.on_dead.append(deaths.append)

    async def main():
        await llm.start()
        params = SamplingParams(max_tokens=100, ignore_eos=True)
        n = 0
        with pytest.raises(EngineDeadError, match="engine core process exited"):
            async for _ in llm.generate(p, params):
                n += 1
                if n == 2:
                    os.kill(llm.client.proc.pid, signal.SIGKILL)
        assert not llm.is_running
        with pytest.raises(EngineDeadError):
            async for _ in llm.generate(p, params):
                pass
        await llm.shutdown()

    asyncio.run(main())
    assert deaths == [-signal.SIGKILL]


def test_a_failing_model_fails_its_requests_and_the_core_keeps_serving(hf_model_dir, monkeypatch):
    from kiln.engine.core import EngineCore
    from kiln.engine.core_client import EngineCoreLoop

    path, _ = hf_model_dir("llama")
    core = EngineCore(str(path), device="cpu", max_model_len=64)
    loop = EngineCoreLoop(core, inbox=None, outboxes=[], parent_pid=os.getppid())
    core.add_request("a", [5, 6, 7], SamplingParams(max_tokens=4))
    execute = core.runner.execute

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(core.runner, "execute", boom)
    assert loop.step() == []
    assert loop.errors == [("a", "the engine failed: RuntimeError: boom")]
    assert not core.has_work()
    core.block_manager.check_all_free()
    monkeypatch.setattr(core.runner, "execute", execute)
    core.add_request("b", [5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True))
    tokens = []
    while core.has_work():
        tokens += [t for d in loop.step() for t in d.new_token_ids]
    assert len(tokens) == 4


class FakeOutbox:
    def __init__(self):
        import msgspec

        from kiln.engine.core_client import CoreOutputs

        self.decode = msgspec.msgpack.Decoder(CoreOutputs).decode
        self.msgs = []

    def send(self, data, copy=True):
        self.msgs.append(self.decode(data))


def test_core_loop_sends_each_clients_outputs_to_it_and_stats_to_all(hf_model_dir):
    from kiln.engine.core import EngineCore
    from kiln.engine.core_client import AddRequest, EngineCoreLoop

    path, _ = hf_model_dir("llama")
    core = EngineCore(str(path), device="cpu", max_model_len=64)
    outboxes = [FakeOutbox(), FakeOutbox()]
    loop = EngineCoreLoop(core, inbox=None, outboxes=outboxes, parent_pid=os.getppid())
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    loop.handle(AddRequest("w0-a", [5, 6, 7], params, 0))
    loop.handle(AddRequest("w1-b", [5, 6, 8], params, 1))
    loop.handle(AddRequest("w1-bad", list(range(100)), params, 1))  # longer than the model
    loop.send([], loop.errors, core.stats(), core.stats())
    while core.has_work():
        loop.send(loop.step(), [], core.stats(), None)
    for i, box in enumerate(outboxes):
        rids = {d.request_id for m in box.msgs for d in m.deltas}
        assert rids == {f"w{i}-{'ab'[i]}"}
        assert all(m.stats is not None for m in box.msgs)
    assert [rid for m in outboxes[1].msgs for rid, _ in m.errors] == ["w1-bad"]
    assert loop.owner == {}  # every request finished: nothing remembered
