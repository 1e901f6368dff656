"""Speculative decoding (kiln.engine.spec_decode) against the plain engine: greedy tokens
exactly equal for every method, the sampled distribution equal to the target's (and a wrong
acceptance rule caught by the same check), seeds, stops, aborts, the batch-size switch-off."""

import random
import shutil
from collections import Counter

import pytest
import torch
from tiny_models import FAMILIES, VOCAB

from kiln.engine import LLM, SamplingParams
from kiln.engine.spec_decode import rejection_sampler
from kiln.engine.spec_decode.ngram import ngram_proposal
from kiln.errors import ConfigError, InputError

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
NGRAM = dict(method="ngram", num_speculative_tokens=3, prompt_lookup_min=1)


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def _generate(path, prompts, params=GREEDY, **engine_args):
    llm = LLM(str(path), device="cpu", **engine_args)
    out = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    llm.engine.block_manager.check_all_free()
    return llm, out


def _stats(llm):
    return llm.engine.stats()


@pytest.fixture(scope="module")
def draft_dir(hf_model_dir, tmp_path_factory):
    """A smaller random llama (1 layer, hidden 32) with the tiny models' vocabulary."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(5)
    model = transformers.AutoModelForCausalLM.from_config(config)
    out = tmp_path_factory.mktemp("draft")
    model.save_pretrained(out)
    return out


def _noisy_copy(path, out, scale=0.6):
    """The checkpoint at `path` with noise on every weight, saved to `out`: a draft close to
    the target, not equal."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def near_draft_dir(hf_model_dir, tmp_path_factory):
    path, _ = hf_model_dir("llama")
    return _noisy_copy(path, tmp_path_factory.mktemp("near_draft"))


def _prompts(random_prompts):
    """A mixed batch; two of the prompts repeat themselves (prompt lookup finds matches)."""
    a, b, c, d = random_prompts((5, 12, 40, 9), seed=21)
    return [a, b * 3, c, d * 4]


def _methods(path, draft_dir=None, near_draft_dir=None):
    """ngram; a smaller random draft (it rarely agrees: lossless is all it shows); a draft
    near the target; the target as its own draft (it always agrees)."""
    return {
        "ngram": NGRAM,
        "small_draft": dict(method="draft_model", model=str(draft_dir), num_speculative_tokens=3),
        "draft_model": dict(model=str(near_draft_dir), num_speculative_tokens=3),
        "same_model": dict(model=str(path), num_speculative_tokens=4),
    }


# ---------------------------------------------------------------------- configuration


def test_ngram_proposal_takes_the_longest_suffix_and_its_newest_full_match():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 5, 2, 3]
    assert ngram_proposal(tokens, 2, 1, 3) == [7, 5]  # "2 3" (no earlier "5 2 3"), newest
    assert ngram_proposal(tokens, 5, 1, 3) == [9, 1, 2, 3, 7]  # the newest with 5 after
    assert ngram_proposal(tokens, 5, 3, 3) == []  # "5 2 3" never came before
    assert ngram_proposal([4, 4, 4, 4], 3, 1, 2) == [4, 4]  # the oldest: most tokens after
    assert ngram_proposal([4], 3, 1, 2) == []


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(method="ngram"), "num_speculative_tokens"),
        (dict(method="medusa", num_speculative_tokens=2), "needs .model."),
        (dict(method="lookahead", num_speculative_tokens=2), "must be one of"),
        (dict(method="ngram", num_speculative_tokens=2, k=3), "unknown speculative_config"),
        (dict(method="draft_model", num_speculative_tokens=2), "needs 'model'"),
        (dict(NGRAM, prompt_lookup_min=4, prompt_lookup_max=2), "prompt_lookup_min"),
    ],
)
def test_bad_speculative_config_is_one_line_input_error(hf_model_dir, config, message):
    path, _ = hf_model_dir("llama")
    with pytest.raises(InputError, match=message):
        LLM(str(path), device="cpu", speculative_config=config)


def test_draft_with_another_vocabulary_is_refused(hf_model_dir, tmp_path):
    import json

    path, _ = hf_model_dir("llama")
    draft = tmp_path / "draft"
    shutil.copytree(path, draft)
    config = json.loads((draft / "config.json").read_text())
    config["vocab_size"] = VOCAB + 16
    (draft / "config.json").write_text(json.dumps(config))
    spec = dict(model=str(draft), num_speculative_tokens=2)
    with pytest.raises(ConfigError, match="vocab_size"):
        LLM(str(path), device="cpu", speculative_config=spec)


def test_serve_flag_takes_a_json_object():
    from kiln.cli import build_parser
    from kiln.engine.config import EngineConfig

    config = '{"method": "ngram", "num_speculative_tokens": 3}'
    argv = ["serve", "--model", "m", "--speculative-config", config]
    args = EngineConfig.args_from(build_parser().parse_args(argv))
    assert args == {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3}}
    assert EngineConfig(**args).speculative.prompt_lookup_max == 5
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--model", "m", "--speculative-config", "[3]"])


# ---------------------------------------------------------------------- greedy: lossless


@pytest.mark.parametrize("method", ["ngram", "small_draft", "draft_model", "same_model"])
def test_greedy_tokens_equal_plain_decoding_in_a_mixed_batch(
    hf_model_dir, random_prompts, draft_dir, near_draft_dir, method
):
    path, _ = hf_model_dir("llama")
    prompts = _prompts(random_prompts)
    _, ref = _generate(path, prompts)
    spec = _methods(path, draft_dir, near_draft_dir)[method]
    llm, out = _generate(path, prompts, speculative_config=spec)
    assert _tokens(out) == _tokens(ref)
    s = _stats(llm)
    assert s["spec_decode_num_drafts"] > 0
    assert (s["spec_decode_num_accepted_tokens"] > 0) == (method != "small_draft")
    assert s["generation_tokens_total"] == 4 * 24
    if method == "same_model":  # the draft is the target: every proposal is right
        assert s["spec_decode_acceptance_rate"] == 1.0
        assert s["spec_decode_mean_acceptance_length"] > 4


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_ngram_tokens_equal_plain_decoding_for_every_family(
    hf_model_dir, random_prompts, name
):
    path, _ = hf_model_dir(name)
    prompts = _prompts(random_prompts)
    _, ref = _generate(path, prompts)
    llm, out = _generate(path, prompts, speculative_config=NGRAM)
    assert _tokens(out) == _tokens(ref)
    assert _stats(llm)["spec_decode_num_drafts"] > 0


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_greedy_tokens_survive_prefix_hits_and_preemption(
    hf_model_dir, random_prompts, tmp_path, method
):
    path, _ = hf_model_dir("qwen3")
    prompts = _prompts(random_prompts)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    _, ref = _generate(path, prompts, params)
    spec = _methods(path, near_draft_dir=_noisy_copy(path, tmp_path))[method]
    llm = LLM(str(path), device="cpu", speculative_config=spec)
    first = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    again = llm.generate(prompt_token_ids=prompts[::-1], sampling_params=params)
    assert llm.engine.block_manager.prefix_cache_hits > 0
    assert _tokens(first) == _tokens(ref) and _tokens(again) == _tokens(ref)[::-1]
    llm.engine.block_manager.check_all_free()
    # 6 blocks of 16 tokens for four sequences growing to 47..88 tokens: preemptions
    llm, tight = _generate(
        path, prompts, params, num_kv_blocks=6, max_model_len=96, speculative_config=spec
    )
    assert llm.engine.scheduler.num_preemptions > 0
    assert _tokens(tight) == _tokens(ref)
    assert _stats(llm)["spec_decode_num_accepted_tokens"] > 0


def test_greedy_penalties_and_logprobs_apply_at_every_verified_position(
    hf_model_dir, random_prompts, near_draft_dir
):
    path, _ = hf_model_dir("llama")
    prompts = _prompts(random_prompts)
    params = SamplingParams(
        temperature=0, repetition_penalty=1.3, frequency_penalty=0.4, logprobs=3,
        max_tokens=16, ignore_eos=True,
    )  # fmt: skip
    _, ref = _generate(path, prompts, params)
    accepted = 0  # penalties make the target turn down repeats: some drafts still pass
    for method in ("ngram", "draft_model", "same_model"):
        spec = _methods(path, near_draft_dir=near_draft_dir)[method]
        llm, out = _generate(path, prompts, params, speculative_config=spec)
        assert _tokens(out) == _tokens(ref)
        accepted += _stats(llm)["spec_decode_num_accepted_tokens"]
        for o, r in zip(out, ref):
            for got, want in zip(o.outputs[0].logprobs, r.outputs[0].logprobs):
                assert list(got) == list(want)
                assert max(abs(got[t] - want[t]) for t in got) < 1e-4
    assert accepted > 0


def test_stop_token_and_max_tokens_end_the_sequence_mid_acceptance(hf_model_dir, random_prompts):
    path, _ = hf_model_dir("llama")
    prompts = _prompts(random_prompts)[:2]
    same = dict(model=str(path), num_speculative_tokens=4)  # accepts all 4 each step
    _, ref = _generate(path, prompts)
    stop = [_tokens(ref)[0][6], _tokens(ref)[1][9]]
    params = [
        SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[t], ignore_eos=True)
        for t in stop
    ]
    _, out = _generate(path, prompts, params, speculative_config=same)
    for o, r, t in zip(out, _tokens(ref), stop):
        assert o.outputs[0].token_ids == r[: r.index(t) + 1]
        assert o.outputs[0].finish_reason == "stop" and o.outputs[0].stop_reason == t
    for n in (1, 2, 7):
        short = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        llm, out = _generate(path, prompts, short, speculative_config=same)
        assert _tokens(out) == [r[:n] for r in _tokens(ref)]
        assert _stats(llm)["generation_tokens_total"] == 2 * n


def test_stop_string_ends_the_text_mid_acceptance(model_with_tokenizer, random_prompts):
    path, _ = model_with_tokenizer
    p = random_prompts((9,), seed=9)[0]
    _, out = _generate(path, [p], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    full = out[0].outputs[0].text
    stop = full[6:9]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop])
    same = dict(model=str(path), num_speculative_tokens=4)
    _, out = _generate(path, [p], params, speculative_config=same)
    assert out[0].outputs[0].text == full[: full.index(stop)]
    assert out[0].outputs[0].finish_reason == "stop"


# ---------------------------------------------------------------------- the engine's state


def test_abort_mid_speculation_leaks_no_block(hf_model_dir, random_prompts, near_draft_dir):
    from kiln.engine.llm_engine import LLMEngine

    path, _ = hf_model_dir("llama")
    spec = _methods(path, near_draft_dir=near_draft_dir)["draft_model"]
    engine = LLMEngine(str(path), device="cpu", speculative_config=spec)
    for i, p in enumerate(_prompts(random_prompts)):
        engine.add_request(str(i), None, SamplingParams(max_tokens=50, ignore_eos=True), p)
    bs = engine.config.block_size
    for _ in range(4):
        engine.step()  # rejected proposals' slots went back: blocks for computed tokens only
        for seq in engine.scheduler.running:
            assert len(seq.block_table) == -(-seq.num_computed_tokens // bs)
            assert seq.num_draft_computed <= seq.num_computed_tokens
    assert engine.stats()["spec_decode_num_drafts"] > 0
    assert (
        engine.stats()["spec_decode_num_accepted_tokens"]
        < engine.stats()["spec_decode_num_draft_tokens"]
    )
    for i in range(4):
        engine.abort(str(i))
    assert not engine.has_unfinished()
    engine.block_manager.check_all_free()


def test_speculation_switches_off_above_disable_by_batch_size(hf_model_dir, random_prompts):
    path, _ = hf_model_dir("llama")
    prompts = _prompts(random_prompts)
    _, ref = _generate(path, prompts)
    off = dict(NGRAM, disable_by_batch_size=3)  # four live sequences: never speculates
    llm, out = _generate(path, prompts, speculative_config=off)
    assert _tokens(out) == _tokens(ref)
    assert _stats(llm)["spec_decode_num_drafts"] == 0
    llm, out = _generate(path, prompts[1:2], speculative_config=off)
    assert _stats(llm)["spec_decode_num_drafts"] > 0


def test_async_scheduling_resumes_between_speculative_steps(
    hf_model_dir, random_prompts, near_draft_dir
):
    """Four sequences of different lengths, speculation only once two or fewer are live:
    async steps (outputs one step behind) and speculative ones (lockstep) alternate."""
    path, _ = hf_model_dir("llama")
    prompts = _prompts(random_prompts)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (8, 30, 14, 40)]
    _, ref = _generate(path, prompts, params)
    for method in ("ngram", "draft_model"):
        spec = dict(_methods(path, near_draft_dir=near_draft_dir)[method], disable_by_batch_size=2)
        llm, out = _generate(path, prompts, params, async_scheduling=True, speculative_config=spec)
        assert _tokens(out) == _tokens(ref)
        assert _stats(llm)["spec_decode_num_accepted_tokens"] > 0


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_seeded_sampling_is_reproducible_in_any_batch(
    hf_model_dir, random_prompts, near_draft_dir, method
):
    path, _ = hf_model_dir("llama")
    prompts = _prompts(random_prompts)
    spec = _methods(path, near_draft_dir=near_draft_dir)[method]
    seeded = SamplingParams(temperature=1.0, top_k=20, seed=1234, max_tokens=20, ignore_eos=True)
    free = SamplingParams(temperature=0.8, max_tokens=20, ignore_eos=True)
    llm = LLM(str(path), device="cpu", speculative_config=spec)
    alone = llm.generate(prompt_token_ids=prompts[1], sampling_params=seeded)
    mixed = llm.generate(prompt_token_ids=prompts, sampling_params=[free, seeded, free, free])
    assert _tokens(alone)[0] == _tokens(mixed)[1]
    key = "spec_decode_num_accepted_tokens" if method == "draft_model" else "spec_decode_num_drafts"
    assert _stats(llm)[key] > 0
    other = SamplingParams(temperature=1.0, top_k=20, seed=99, max_tokens=20, ignore_eos=True)
    assert _tokens(llm.generate(prompt_token_ids=prompts[1], sampling_params=other)) != _tokens(
        alone
    )


# ---------------------------------------------------------------------- sampling: lossless


def _tv(counts: Counter, probs: dict) -> float:
    n = sum(counts.values())
    keys = set(counts) | set(probs)
    return 0.5 * sum(abs(counts[k] / n - probs.get(k, 0.0)) for k in keys)


def _always_accept(p, q, draft, u):
    """A wrong rule: every draft token is taken as it is."""
    return draft >= 0, (p - q).clamp(min=0)


@pytest.mark.parametrize("wrong", [False, True])
def test_rejection_sampler_reproduces_the_target_distribution(wrong):
    """Many rows of one small-vocabulary step: the tokens that come out (accepted drafts,
    else residual samples) are distributed as p, for drafts from a distribution q and for
    point masses (prompt lookup); the always-accept rule fails the same check."""
    from kiln.engine.sampler import Sampler

    g = torch.Generator().manual_seed(0)
    rule = _always_accept if wrong else rejection_sampler.rejection_sample
    n, v = 200_000, 6
    p = torch.softmax(2 * torch.randn(v, generator=g), 0)
    q = torch.softmax(2 * torch.randn(v, generator=g), 0)
    for draft_q in (q, None):  # a draft model's distribution; a point mass on token 0
        if draft_q is None:
            draft, qs = torch.zeros(n, dtype=torch.long), torch.zeros(n, v)
            qs[:, 0] = 1.0
        else:
            draft = torch.multinomial(draft_q, n, replacement=True, generator=g)
            qs = draft_q.expand(n, v)
        ok, residual = rule(p.expand(n, v), qs, draft, torch.rand(n, generator=g))
        resampled = Sampler.draw(residual.clone(), [_Row()] * n)
        tokens = torch.where(ok, draft, resampled)
        got = torch.bincount(tokens, minlength=v).float() / n
        tv = 0.5 * (got - p).abs().sum().item()
        assert (tv > 0.1) if wrong else (tv < 0.01), tv


class _Row:
    generator = None


def _exact_distribution(hf, prompt: list[int], steps: int, top_k: int) -> dict:
    """The target's distribution over its first `steps` tokens at temperature 1 within
    top_k, enumerated with the transformers model."""
    dist = {(): 1.0}
    for _ in range(steps):
        nxt = {}
        for prefix, pr in dist.items():
            with torch.no_grad():
                logits = hf(torch.tensor([prompt + list(prefix)])).logits[0, -1]
            top = logits.topk(top_k)
            for t, pt in zip(top.indices.tolist(), torch.softmax(top.values, 0).tolist()):
                nxt[(*prefix, t)] = pr * pt
        dist = nxt
    return dist


@pytest.mark.parametrize("wrong", [False, True])
def test_verify_step_reproduces_the_targets_distribution(monkeypatch, wrong):
    """A verify step of two proposals over a 5-token vocabulary, 20000 sequences at once
    (bigram target and draft, temperature 0.8, top_k 4, a presence penalty: the processing
    depends on the tokens before each position), each completed to three tokens from the
    target: the three tokens are distributed as the target's own (total variation within
    sampling noise); an always-accept rule fails the same check."""
    from kiln.engine.sampler import Sampler
    from kiln.engine.sequence import Sequence
    from kiln.engine.spec_decode.config import SpeculativeConfig
    from kiln.engine.spec_decode.decoder import SpecDecoder

    if wrong:
        monkeypatch.setattr(rejection_sampler, "rejection_sample", _always_accept)
    v, n, first = 5, 20_000, 1
    g = torch.Generator().manual_seed(1)
    target = 1.5 * torch.randn(v, v, generator=g)  # logits of the next token by the last one
    draft = target + torch.randn(v, v, generator=g)
    params = SamplingParams(temperature=0.8, top_k=4, presence_penalty=0.5, max_tokens=9)
    sampler = Sampler(v)

    def probs(table, history):  # the sampler's distribution after prompt [0] + history
        seq = Sequence(0, "r", 0, [0, *history], params)
        seq.num_prompt_tokens = 1
        logits, _, _ = sampler.process(table[history[-1]][None].clone(), [seq])
        return sampler.probs(logits, [seq])[0]

    exact, p_next = {}, {}
    for a in range(v):
        for b in range(v):
            for c in range(v):
                hist = [first]
                pr = 1.0
                for t in (a, b, c):
                    key = tuple(hist)
                    if key not in p_next:
                        p_next[key] = probs(target, hist)
                    pr *= p_next[key][t].item()
                    hist.append(t)
                exact[(a, b, c)] = pr
    q1 = probs(draft, [first])
    q2 = torch.stack([probs(draft, [first, a]) for a in range(v)])
    d1 = torch.multinomial(q1, n, replacement=True, generator=g)
    d2 = torch.multinomial(q2[d1], 1, generator=g)[:, 0]
    seqs = []
    for i, (a, b) in enumerate(zip(d1.tolist(), d2.tolist())):
        seq = Sequence(i, str(i), 0, [0, first], params)
        seq.num_prompt_tokens = 1
        seq.spec_token_ids = [a, b]
        seq.spec_probs = torch.stack([q1, q2[a]])
        seqs.append(seq)
    logits = target[torch.stack([torch.full((n,), first), d1, d2], 1).ravel()]  # [3n, v]
    decoder = SpecDecoder(SpeculativeConfig("ngram", num_speculative_tokens=2), None)
    result, kept = decoder.accept(sampler, logits, seqs)
    rng = random.Random(2)
    counts = Counter()
    for rows in kept:
        hist = [first] + result.token_ids[rows]
        while len(hist) < 4:  # later steps sample from the target
            hist += rng.choices(range(v), p_next[tuple(hist)].tolist())
        counts[tuple(hist[1:4])] += 1
    tv = _tv(counts, exact)
    if wrong:
        assert tv > 0.1, tv
    else:  # sampling noise alone: below 0.4 * sum(sqrt(p)) / sqrt(n) = 0.03
        assert 0.2 < decoder.stats.acceptance_rate < 0.9
        assert decoder.stats.accepted_per_pos[1] > 0
        assert tv < 0.03, tv


@pytest.mark.parametrize("wrong", [False, True])
def test_sampled_tokens_are_distributed_as_the_targets(
    hf_model_dir, random_prompts, tmp_path, monkeypatch, wrong
):
    """The engine end to end with a draft model: samples of a four-token continuation (the
    first token from the prompt's step, then two proposals and a bonus verified in one step,
    more steps after a rejection) against the target's exact distribution over the four
    tokens (top_k=2: 16 outcomes); an always-accept rule is caught by the same check."""
    path, hf = hf_model_dir("llama")
    prompt = random_prompts((6,), seed=40)[0]
    exact = _exact_distribution(hf, prompt, 4, top_k=2)
    if wrong:
        monkeypatch.setattr(rejection_sampler, "rejection_sample", _always_accept)
    draft = _noisy_copy(path, tmp_path, scale=0.15)
    spec = dict(model=str(draft), num_speculative_tokens=2, disable_by_batch_size=10**6)
    llm = LLM(str(path), device="cpu", speculative_config=spec)
    params = SamplingParams(temperature=1.0, top_k=2, max_tokens=4, ignore_eos=True)
    n = 100 if wrong else 400  # the wrong rule is far off; the right one needs precision
    out = llm.generate(prompt_token_ids=[prompt] * n, sampling_params=params)
    tv = _tv(Counter(map(tuple, _tokens(out))), exact)
    if wrong:
        assert tv > 0.3, tv
    else:  # sampling noise alone: about 0.4 * sum(sqrt(p)) / sqrt(n) <= 0.08
        assert 0.05 < _stats(llm)["spec_decode_acceptance_rate"] < 0.95
        assert tv < 0.15, tv


def test_metrics_show_acceptance_in_vllm_names(hf_model_dir, random_prompts):
    from kiln.serve.metrics import ServerMetrics

    path, _ = hf_model_dir("llama")
    llm, _ = _generate(path, _prompts(random_prompts), speculative_config=NGRAM)
    s = _stats(llm)
    text = ServerMetrics(lambda: s).render().decode()
    drafts = s["spec_decode_num_drafts"]
    assert f"kiln:spec_decode_num_drafts_total {float(drafts)}" in text
    accepted = float(s["spec_decode_num_accepted_tokens"])
    assert f"kiln:spec_decode_num_accepted_tokens_total {accepted}" in text
    first = float(s["spec_decode_num_accepted_tokens_per_pos"][0])
    assert f'kiln:spec_decode_num_accepted_tokens_per_pos_total{{position="0"}} {first}' in text
    assert "kiln:spec_decode_mean_acceptance_length" in text
    assert s["spec_decode_mean_acceptance_length"] == 1 + accepted / drafts
    assert (
        "spec_decode"
        not in ServerMetrics(lambda: _stats(LLM(str(path), device="cpu"))).render().decode()
    )


def test_async_engine_streams_speculative_tokens_and_stats(hf_model_dir, random_prompts):
    """The engine-core process with speculation on: DELTA streams several tokens a step,
    the per-position counts come back in stats, async scheduling resumes when it is off."""
    import asyncio

    from kiln.engine.async_engine import AsyncLLM
    from kiln.engine.sampling_params import RequestOutputKind

    path, _ = hf_model_dir("llama")
    prompts = _prompts(random_prompts)
    _, ref = _generate(path, prompts)
    spec = dict(model=str(path), num_speculative_tokens=4)
    llm = AsyncLLM(str(path), device="cpu", async_scheduling=True, speculative_config=spec)
    params = SamplingParams(
        temperature=0, max_tokens=24, ignore_eos=True, output_kind=RequestOutputKind.DELTA
    )

    async def one(i):
        return [o.outputs[0].token_ids async for o in llm.generate(prompts[i], params, str(i))]

    async def main():
        await llm.start()
        deltas = await asyncio.gather(*(one(i) for i in range(4)))
        await asyncio.sleep(0.1)
        stats = llm.stats()
        await llm.shutdown()
        return deltas, stats

    deltas, stats = asyncio.run(main())
    assert [sum(d, []) for d in deltas] == _tokens(ref)
    assert max(len(t) for d in deltas for t in d) > 1  # several tokens in one step
    assert stats["spec_decode_num_accepted_tokens_per_pos"][3] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama", "qwen3", "gpt2"])
def test_speculation_on_gpu_with_graphs_matches_plain_torch_backend(
    hf_model_dir, random_prompts, name
):
    """Triton kernels, CUDA graphs (verify steps in the mixed graphs, the draft's decodes in
    its own) and async scheduling between speculative steps: the plain torch backend's
    greedy tokens (float32: exact)."""
    path, _ = hf_model_dir(name)
    prompts = _prompts(random_prompts)
    _, ref = run_on_gpu(path, prompts, attention_backend="torch", use_cuda_graph=False,
                        fuse_weights=False)  # fmt: skip
    for spec in (NGRAM, dict(model=str(path), num_speculative_tokens=4)):
        llm, out = run_on_gpu(path, prompts, speculative_config=spec)
        assert llm.engine.runner.graph_runner.mixed
        assert out == ref
        assert _stats(llm)["spec_decode_num_accepted_tokens"] > 0
        spec = dict(spec, disable_by_batch_size=2)  # speculation on and off
        assert run_on_gpu(path, prompts, speculative_config=spec)[1] == ref


def run_on_gpu(path, prompts, **engine_args):
    """(engine, greedy tokens) on CUDA in float32 (exact against the torch backend)."""
    llm = LLM(str(path), dtype="float32", device="cuda", kv_cache_memory_bytes=2**26,
              **engine_args)  # fmt: skip
    out = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    llm.engine.block_manager.check_all_free()
    return llm, _tokens(out)


def test_n_siblings_fork_then_speculate_each(hf_model_dir, random_prompts, near_draft_dir):
    """n=3 sampled siblings share the prompt's step (it does not speculate: they fork off
    its logits), then each verifies its own proposals; greedy siblings stay equal."""
    path, _ = hf_model_dir("llama")
    prompt = _prompts(random_prompts)[1]
    greedy = SamplingParams(n=2, temperature=0, max_tokens=20, ignore_eos=True)
    _, ref = _generate(path, [prompt], greedy)
    spec = _methods(path, near_draft_dir=near_draft_dir)["draft_model"]
    llm, out = _generate(path, [prompt], greedy, speculative_config=spec)
    assert [c.token_ids for c in out[0].outputs] == [c.token_ids for c in ref[0].outputs]
    sampled = SamplingParams(n=3, temperature=0.7, seed=5, max_tokens=20, ignore_eos=True)
    first = llm.generate(prompt_token_ids=[prompt], sampling_params=sampled)
    again = llm.generate(prompt_token_ids=[prompt], sampling_params=sampled)
    assert [c.token_ids for c in first[0].outputs] == [c.token_ids for c in again[0].outputs]
    assert len({tuple(c.token_ids) for c in first[0].outputs}) == 3
    assert _stats(llm)["spec_decode_num_accepted_tokens"] > 0
    llm.engine.block_manager.check_all_free()


@pytest.mark.parametrize("method", ["ngram", "same_model"])
def test_verify_and_draft_steps_staged_in_graph_buffers_give_the_same_tokens(
    hf_model_dir, random_prompts, monkeypatch, method
):
    """Verify steps through the mixed graphs' buffers (a logits row for every proposal) and
    the draft's steps through its own decode and mixed graphs (CUDA graphs need a GPU: here
    each "graph" runs the eager forward over exactly the staged buffers, as in
    test_graph_inputs)."""
    from engine.test_graph_inputs import _fake_graphs, _fake_mixed_graphs

    path, _ = hf_model_dir("qwen3")
    prompts = _prompts(random_prompts)
    _, ref = _generate(path, prompts)
    spec = _methods(path)[method]
    llm = LLM(str(path), device="cpu", max_num_seqs=64, speculative_config=spec)
    runners = [llm.engine.runner]
    if method == "same_model":
        runners.append(llm.engine.core.spec.proposer.runner)
    replays = Counter()
    for i, runner in enumerate(runners):
        fake = type("FakeLLM", (), {"engine": type("E", (), {"runner": runner})})
        _fake_graphs(fake, sample_in_graph=True)
        _fake_mixed_graphs(fake, sample_in_graph=True, sizes=(16, 32, 64))
        g = runner.graph_runner
        for kind, graphs in (("decode", g.graphs), ("mixed", g.mixed)):
            for graph in graphs.values():
                replay = graph.replay
                monkeypatch.setattr(
                    graph, "replay", lambda r=replay, k=(i, kind): (replays.update([k]), r())
                )
    out = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    llm.engine.block_manager.check_all_free()
    assert _tokens(out) == _tokens(ref)
    assert _stats(llm)["spec_decode_num_accepted_tokens"] > 0
    assert replays[(0, "mixed")] >= 5  # the verify steps (and the prompts') went through them
    if method == "same_model":
        assert replays[(1, "decode")] >= 5 and replays[(1, "mixed")] >= 3, replays


def test_small_budget_and_the_context_end_cut_the_proposals(hf_model_dir, random_prompts):
    """A token budget of 6 (chunked prompts beside verify steps; k cut to what is left) and a
    context that ends mid-output (k cut to the room left): the plain engine's tokens."""
    path, _ = hf_model_dir("llama")
    prompts = _prompts(random_prompts)
    args = dict(max_num_batched_tokens=6, max_model_len=52)
    _, ref = _generate(path, prompts, **args)
    assert {o.outputs[0].finish_reason for o in ref} == {"length"}
    same = dict(model=str(path), num_speculative_tokens=4)
    llm, out = _generate(path, prompts, speculative_config=same, **args)
    assert _tokens(out) == _tokens(ref)
    assert len(_tokens(out)[2]) == 52 - 40  # the 40-token prompt stopped at the context
    assert _stats(llm)["spec_decode_num_accepted_tokens"] > 0


@pytest.mark.parametrize("seed", range(3))
def test_random_batches_and_engine_settings_keep_greedy_tokens(hf_model_dir, near_draft_dir, seed):
    """Random prompts (repetitive or not), lengths, penalties, stop ids, token budgets, pool
    sizes, prefix caching and async scheduling: both methods give the plain engine's tokens
    and finish reasons, and return every block."""
    path, _ = hf_model_dir("llama")
    rng = random.Random(seed)
    engine_args = dict(
        max_num_batched_tokens=rng.choice([8, 64, 8192]), max_model_len=64, num_kv_blocks=6,
        enable_prefix_caching=rng.random() < 0.7, async_scheduling=rng.random() < 0.5,
    )  # fmt: skip
    prompts, params = [], []
    for _ in range(rng.randint(3, 7)):
        base = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 12))]
        prompts.append((base * 5)[: rng.randint(1, 50)])
        params.append(
            SamplingParams(
                temperature=0, max_tokens=rng.randint(1, 40), ignore_eos=True,
                repetition_penalty=rng.choice([1.0, 1.2]),
                stop_token_ids=[rng.randrange(3, VOCAB)] if rng.random() < 0.3 else [],
            )
        )  # fmt: skip
    _, ref = _generate(path, prompts, params, **engine_args)
    k = rng.randint(1, 5)
    for spec in (
        dict(NGRAM, num_speculative_tokens=k),
        dict(model=str(near_draft_dir), num_speculative_tokens=k, disable_by_batch_size=3),
    ):
        _, out = _generate(path, prompts, params, speculative_config=spec, **engine_args)
        assert _tokens(out) == _tokens(ref)
        assert [o.outputs[0].finish_reason for o in out] == [
            o.outputs[0].finish_reason for o in ref
        ]
