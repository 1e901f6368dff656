"""kiln.LLM against Hugging Face transformers, and against itself under every engine feature."""

import pytest
from tiny_models import FAMILIES

from kiln.engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
LENGTHS = (3, 19, 40, 9)


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def _generate(path, prompts, params=GREEDY, **engine_args):
    llm = LLM(str(path), device="cpu", **engine_args)
    out = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    llm.engine.block_manager.check_all_free()
    return llm, out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_matches_transformers_in_mixed_batch(hf_model_dir, random_prompts, hf_greedy, name):
    path, hf = hf_model_dir(name)
    prompts = random_prompts(LENGTHS, seed=1)
    _, out = _generate(path, prompts)
    assert _tokens(out) == [hf_greedy(hf, p, 12) for p in prompts]


def test_sliding_window_past_the_window_matches_transformers(
    hf_model_dir, random_prompts, hf_greedy
):
    path, hf = hf_model_dir("mistral")  # window 8, prompts and outputs well past it
    prompts = random_prompts((30, 5), seed=2)
    _, out = _generate(path, prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert _tokens(out) == [hf_greedy(hf, p, 20) for p in prompts]


@pytest.fixture(scope="module")
def reference(hf_model_dir, random_prompts):
    """Greedy tokens of a mixed batch from a plain engine run (no cache hits, one chunk)."""
    path, _ = hf_model_dir("qwen3")
    prompts = random_prompts((33, 7, 50, 16), seed=3)
    _, out = _generate(path, prompts, enable_prefix_caching=False)
    return path, prompts, _tokens(out)


def test_unfused_weights_give_same_tokens(reference):
    path, prompts, ref = reference
    _, out = _generate(path, prompts, fuse_weights=False)
    assert _tokens(out) == ref


def test_prefix_cache_hits_give_same_tokens(reference):
    path, prompts, ref = reference
    llm = LLM(str(path), device="cpu")
    first = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    assert llm.engine.block_manager.prefix_cache_hits == 0
    again = llm.generate(prompt_token_ids=prompts[::-1], sampling_params=GREEDY)
    assert llm.engine.block_manager.prefix_cache_hits > 0
    assert _tokens(first) == ref and _tokens(again) == ref[::-1]
    llm.engine.block_manager.check_all_free()


def test_chunked_prefill_gives_same_tokens(reference):
    path, prompts, ref = reference
    llm, out = _generate(path, prompts, max_num_batched_tokens=5)
    assert _tokens(out) == ref


def test_preemption_gives_same_tokens(reference):
    path, prompts, _ = reference
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    _, ref = _generate(path, prompts, params)
    # 6 blocks of 16 tokens for four sequences growing to 47..90 tokens: preemptions.
    llm, out = _generate(path, prompts, params, num_kv_blocks=6, max_model_len=96)
    assert llm.engine.scheduler.num_preemptions > 0
    assert _tokens(out) == _tokens(ref)


def test_other_requests_in_batch_do_not_change_tokens(reference):
    path, prompts, ref = reference
    for p, r in zip(prompts, ref):
        _, out = _generate(path, [p])
        assert _tokens(out) == [r]


def test_seeded_sampling_is_reproducible_in_any_batch(hf_model_dir, random_prompts):
    path, _ = hf_model_dir("llama")
    p = random_prompts((10,), seed=4)[0]
    others = random_prompts((5, 30, 12), seed=5)
    seeded = SamplingParams(
        temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True
    )
    free = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    llm = LLM(str(path), device="cpu")
    alone = llm.generate(prompt_token_ids=[p], sampling_params=seeded)
    mixed = llm.generate(
        prompt_token_ids=[others[0], p, *others[1:]], sampling_params=[free, seeded, free, free]
    )
    assert alone[0].outputs[0].token_ids == mixed[1].outputs[0].token_ids
    other_seed = llm.generate(
        prompt_token_ids=[p],
        sampling_params=SamplingParams(temperature=1.0, seed=99, max_tokens=16, ignore_eos=True),
    )
    assert other_seed[0].outputs[0].token_ids != alone[0].outputs[0].token_ids


def test_repetition_penalty_matches_transformers(hf_model_dir, random_prompts, hf_greedy):
    path, hf = hf_model_dir("llama")
    prompts = random_prompts((8, 20), seed=6)
    params = SamplingParams(temperature=0, repetition_penalty=1.5, max_tokens=16, ignore_eos=True)
    _, out = _generate(path, prompts, params)
    assert _tokens(out) == [hf_greedy(hf, p, 16, repetition_penalty=1.5) for p in prompts]


def test_logprobs_are_the_models_distribution(hf_model_dir, random_prompts):
    import torch

    path, hf = hf_model_dir("llama")
    p = random_prompts((12,), seed=7)[0]
    _, out = _generate(
        path, [p], SamplingParams(temperature=0, max_tokens=3, logprobs=5, ignore_eos=True)
    )
    comp = out[0].outputs[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([p + comp.token_ids])).logits[0], -1)
    for i, (tok, lps) in enumerate(zip(comp.token_ids, comp.logprobs)):
        row = ref[len(p) - 1 + i]
        top = row.topk(5)
        assert list(lps)[:5] == top.indices.tolist()
        assert abs(lps[tok] - row[tok].item()) < 1e-4
    assert (
        abs(comp.cumulative_logprob - sum(c[t] for t, c in zip(comp.token_ids, comp.logprobs)))
        < 1e-4
    )


def test_min_tokens_holds_back_stop_tokens(hf_model_dir, random_prompts):
    path, _ = hf_model_dir("llama")
    p = random_prompts((6,), seed=8)[0]
    _, out = _generate(path, [p], SamplingParams(temperature=0, max_tokens=8))
    first = out[0].outputs[0].token_ids[0]
    params = SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[first], min_tokens=4)
    _, out = _generate(path, [p], params)
    comp = out[0].outputs[0]
    assert first not in comp.token_ids[:4] and len(comp.token_ids) >= 4
    params = SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[first])
    _, out = _generate(path, [p], params)
    assert out[0].outputs[0].token_ids == [first]
    assert out[0].outputs[0].finish_reason == "stop" and out[0].outputs[0].stop_reason == first


def test_stop_string_ends_text_and_is_never_shown(model_with_tokenizer, random_prompts):
    path, _ = model_with_tokenizer
    p = random_prompts((9,), seed=9)[0]
    _, out = _generate(path, [p], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    full = out[0].outputs[0].text
    assert len(full) == 20
    stop = full[6:9]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop, "zz"])
    _, out = _generate(path, [p], params)
    comp = out[0].outputs[0]
    assert comp.text == full[: full.index(stop)]
    assert comp.finish_reason == "stop" and comp.stop_reason == stop


def test_n_samples_share_prompt_blocks(hf_model_dir, random_prompts):
    from kiln.engine.llm_engine import LLMEngine

    path, _ = hf_model_dir("llama")
    engine = LLMEngine(str(path), device="cpu")
    p = random_prompts((40,), seed=10)[0]  # 2 full blocks + 8 tokens
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    engine.add_request("r", None, params, p)
    engine.step()
    seqs = engine.core.requests["r"].seqs
    assert len(seqs) == 3 and len({tuple(s.block_table) for s in seqs}) == 1
    assert [engine.block_manager.blocks[b].ref_count for b in seqs[0].block_table] == [3] * 3
    engine.step()  # each writes into the shared partial block: copy on write
    assert len({s.block_table[2] for s in seqs}) == 3
    assert len({s.block_table[0] for s in seqs}) == 1
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.finished]
    comps = outs[0].outputs
    assert [c.index for c in comps] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in comps}) == 3
    engine.block_manager.check_all_free()


def test_n_greedy_samples_agree_with_single(hf_model_dir, random_prompts, hf_greedy):
    path, hf = hf_model_dir("llama")
    p = random_prompts((21,), seed=11)[0]
    params = SamplingParams(n=2, temperature=0, max_tokens=10, ignore_eos=True)
    _, out = _generate(path, [p], params)
    ref = hf_greedy(hf, p, 10)
    assert [c.token_ids for c in out[0].outputs] == [ref, ref]


def test_beam_search_ranks_real_hypotheses(hf_model_dir, random_prompts, hf_greedy):
    import torch

    path, hf = hf_model_dir("llama")
    p = random_prompts((10,), seed=12)[0]
    params = SamplingParams(
        n=2, best_of=3, use_beam_search=True, temperature=0, max_tokens=6, ignore_eos=True
    )
    _, out = _generate(path, [p], params)
    comps = out[0].outputs
    assert len(comps) == 2 and comps[0].token_ids != comps[1].token_ids
    for c in comps:
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([p + c.token_ids])).logits[0], -1)
        ref = sum(lp[len(p) - 1 + i, t].item() for i, t in enumerate(c.token_ids))
        assert abs(c.cumulative_logprob - ref) < 1e-3
    assert comps[0].cumulative_logprob >= comps[1].cumulative_logprob
    greedy = hf_greedy(hf, p, 6)
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([p + greedy])).logits[0], -1)
    greedy_lp = sum(lp[len(p) - 1 + i, t].item() for i, t in enumerate(greedy))
    assert comps[0].cumulative_logprob >= greedy_lp - 1e-4
