"""Beam search as a client of the engine: kiln.LLM (in-process) and AsyncLLM (over the
engine-core process) against transformers' beam search, EOS hypotheses, and aborts."""

import asyncio
import json
import shutil

import pytest
import torch

from kiln.engine import LLM, SamplingParams
from kiln.engine.async_engine import AsyncLLM
from kiln.engine.llm_engine import LLMEngine
from kiln.errors import InputError

# (beam width, n, length_penalty, max_tokens)
CASES = [(2, 2, 1.0, 6), (3, 2, 1.0, 8), (4, 4, 0.5, 7), (5, 3, 2.0, 10), (3, 1, 1.0, 12)]


def beam_params(width, n, length_penalty, max_tokens, ignore_eos=True):
    return SamplingParams(
        n=n, best_of=width, use_beam_search=True, temperature=0, max_tokens=max_tokens,
        length_penalty=length_penalty, ignore_eos=ignore_eos,
    )  # fmt: skip


def hf_beam_search(hf, prompt, width, n, length_penalty, max_tokens):
    """transformers' beam search: the n best hypotheses' new tokens and their scores."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=width,
            num_return_sequences=n, max_new_tokens=max_tokens, length_penalty=length_penalty,
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
    return [s[len(prompt) :].tolist() for s in out.sequences], out.sequences_scores.tolist()


def run_served(path, prompts, params, **engine_args):
    """Every (prompt, params) through AsyncLLM at once; the outputs and the core's stats."""
    llm = AsyncLLM(str(path), device="cpu", **engine_args)

    async def one(prompt, p):
        outs = [o async for o in llm.generate(prompt, p)]
        assert len(outs) == 1 and outs[0].finished  # one output, at the end
        return outs[0]

    async def main():
        await llm.start()
        outs = await asyncio.gather(*(one(q, p) for q, p in zip(prompts, params)))
        await llm.shutdown()
        return outs

    outs = asyncio.run(main())
    return outs, llm.stats()


def run_offline(path, prompts, params, **engine_args):
    llm = LLM(str(path), device="cpu", **engine_args)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    llm.engine.block_manager.check_all_free()
    return outs, llm.engine.stats()


@pytest.mark.parametrize("run", [run_offline, run_served], ids=["offline", "served"])
def test_beam_search_matches_transformers(hf_model_dir, random_prompts, run):
    path, hf = hf_model_dir("llama")  # its generation config has no EOS: beams run to the end
    prompts = random_prompts((5, 10, 17, 40, 23), seed=12)
    outs, stats = run(path, prompts, [beam_params(*case) for case in CASES])
    for prompt, case, out in zip(prompts, CASES, outs):
        tokens, scores = hf_beam_search(hf, prompt, *case)
        assert [c.token_ids for c in out.outputs] == tokens, case
        length_penalty = case[2]
        got = [c.cumulative_logprob / len(c.token_ids) ** length_penalty for c in out.outputs]
        assert got == pytest.approx(scores, abs=1e-4)
        assert all(c.finish_reason == "length" for c in out.outputs)
    assert stats["prefix_cache_hits"] > 0  # the beams' shared prefixes are not recomputed
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


@pytest.fixture(scope="module")
def eos_model_dir(hf_model_dir, tmp_path_factory):
    """The tiny llama with 40 EOS ids (about a tenth of the vocabulary): hypotheses end."""
    src, hf = hf_model_dir("llama")
    out = tmp_path_factory.mktemp("llama_eos")
    shutil.copytree(src, out, dirs_exist_ok=True)
    gen = json.loads((out / "generation_config.json").read_text())
    gen["eos_token_id"] = list(range(5, 45))
    (out / "generation_config.json").write_text(json.dumps(gen))
    return out, hf


def test_eos_ends_hypotheses_offline_and_served_alike(eos_model_dir, random_prompts):
    path, hf = eos_model_dir
    eos = set(range(5, 45))
    prompts = random_prompts((4, 11, 23), seed=7)
    params = [beam_params(w, n, lp, 8, ignore_eos=False) for w, n, lp, _ in CASES[:3]]
    offline, _ = run_offline(path, prompts, params, max_model_len=64)
    served, _ = run_served(path, prompts, params, max_model_len=64)
    reasons = set()
    for prompt, p, a, b in zip(prompts, params, offline, served):
        got = [(c.token_ids, c.finish_reason) for c in a.outputs]
        assert got == [(c.token_ids, c.finish_reason) for c in b.outputs]
        scores = [c.cumulative_logprob / len(c.token_ids) ** p.length_penalty for c in a.outputs]
        assert scores == sorted(scores, reverse=True) and len(scores) == p.n
        for c in a.outputs:
            reasons.add(c.finish_reason)
            ends = c.token_ids[-1] in eos
            assert ends == (c.finish_reason == "stop") and not eos & set(c.token_ids[:-1])
            assert c.finish_reason == "stop" or len(c.token_ids) == 8
            with torch.no_grad():
                lp = torch.log_softmax(hf(torch.tensor([prompt + c.token_ids])).logits[0], -1)
            ref = sum(lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(c.token_ids))
            assert c.cumulative_logprob == pytest.approx(ref, abs=1e-3)
    assert reasons == {"stop", "length"}


def test_beam_search_runs_to_the_context_without_max_tokens(hf_model_dir, random_prompts):
    path, _ = hf_model_dir("llama")
    (prompt,) = random_prompts((60,), seed=13)
    params = SamplingParams(n=2, best_of=3, use_beam_search=True, temperature=0,
                            max_tokens=None, ignore_eos=True)  # fmt: skip
    (out,), _ = run_offline(path, [prompt], params, max_model_len=64)
    assert [len(c.token_ids) for c in out.outputs] == [4, 4]


def test_cancelled_served_beam_search_frees_every_block(hf_model_dir, random_prompts):
    path, _ = hf_model_dir("llama")
    (prompt,) = random_prompts((20,), seed=14)
    llm = AsyncLLM(str(path), device="cpu", max_model_len=256)
    params = beam_params(4, 2, 1.0, 200)

    async def main():
        await llm.start()
        search = asyncio.ensure_future(anext(llm.generate(prompt, params, "beams")))
        for _ in range(500):  # until a few beam steps have run
            if llm.stats()["generation_tokens_total"] >= 12:
                break
            await asyncio.sleep(0.02)
        assert not search.done()
        search.cancel()
        await asyncio.gather(search, return_exceptions=True)
        await asyncio.sleep(0.3)  # stats newer than the aborts
        for _ in range(250):  # the aborts land on the core's loop
            s = llm.stats()
            if s["num_running"] == s["num_waiting"] == 0 and s["kv_cache_usage"] == 0:
                break
            await asyncio.sleep(0.02)
        stats, left = llm.stats(), (dict(llm._collectors), set(llm._searches))
        await asyncio.sleep(0.3)
        later = llm.stats()["generation_tokens_total"]
        await llm.shutdown()
        return stats, left, later

    stats, left, later = asyncio.run(main())
    assert left == ({}, set())
    assert later == stats["generation_tokens_total"]  # no beam step after the cancel
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


def test_beam_search_is_no_request_of_the_engine_and_its_width_is_bounded(hf_model_dir):
    path, _ = hf_model_dir("llama")
    engine = LLMEngine(str(path), device="cpu", max_model_len=64)
    with pytest.raises(InputError, match="beam search") as e:
        engine.add_request("a", None, beam_params(2, 2, 1.0, 4), [5, 6, 7])
    assert e.value.param == "use_beam_search" and not engine.has_unfinished()
    with pytest.raises(InputError, match="best_of=11") as e:
        beam_params(11, 2, 1.0, 4)  # a step reads the top 2 * 11 logprobs: more than 20
    assert e.value.param == "best_of"
