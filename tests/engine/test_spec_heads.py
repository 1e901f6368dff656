"""Speculative decoding over the target's hidden states (kiln.engine.spec_decode.heads and
.hidden: medusa, eagle, early_exit) and `kiln train-draft`: every proposal is what the draft
computes in plain torch from the target's states, greedy tokens are the plain engine's (mixed
batches, prefix hits, preemption, async steps between, CUDA-graph buffers), sampled tokens are
distributed as the target's, blocks all come back; the draft directory, its checks, training,
and early exit without verification (lossy, as the cut model decodes)."""

import json
import logging
from collections import Counter

import pytest
import torch
from engine.test_spec_decode import (
    _always_accept,
    _exact_distribution,
    _generate,
    _prompts,
    _tokens,
    _tv,
    run_on_gpu,
)
from tiny_models import VOCAB, save_chat_tokenizer

from kiln.engine import LLM, SamplingParams
from kiln.engine.spec_decode import rejection_sampler
from kiln.engine.spec_decode.heads import (
    EagleDraft,
    EarlyExitHead,
    MedusaHeads,
    load_draft,
    read_draft,
    save_draft,
)
from kiln.engine.spec_decode.hidden import exit_model
from kiln.errors import ConfigError, InputError
from kiln.model.loader import load_model, save_model

METHODS = ("medusa", "eagle", "early_exit")
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def _run(path, prompts, params=GREEDY, **engine_args):
    """(engine, greedy tokens) of test_spec_decode's _generate (blocks all back)."""
    llm, out = _generate(path, prompts, params, **engine_args)
    return llm, _tokens(out)


def _make_draft(method: str, target, seed: int = 0, noise: float = 0.3):
    """A draft for `target` near its starting point (kiln.train_draft.init_from_target) with
    noise on every weight of its own: proposals the target sometimes takes."""
    from kiln.train_draft import init_from_target

    config = target.config
    draft = {
        "medusa": lambda: MedusaHeads(config.hidden_size, 4),
        "eagle": lambda: EagleDraft(config),
        "early_exit": lambda: EarlyExitHead(config, 1),
    }[method]().bind(target)
    init_from_target(draft, target)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.own_state_dict().values():
            p.add_(noise * max(p.std().item(), 0.1) * torch.randn(p.shape, generator=g))
    return draft.eval()


@pytest.fixture(scope="module")
def drafts(hf_model_dir, tmp_path_factory):
    """drafts(family) -> {method: (draft directory, the draft bound to the plain target)}."""
    cache = {}

    def get(name: str):
        if name not in cache:
            path, _ = hf_model_dir(name)
            target = load_model(path, device="cpu")
            cache[name] = {}
            for method in METHODS:
                draft = _make_draft(method, target)
                out = save_draft(tmp_path_factory.mktemp(f"{name}_{method}"), draft, target.config)
                cache[name][method] = (out, draft)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def plain(hf_model_dir, random_prompts):
    """plain(family, max_tokens) -> the plain engine's greedy tokens for _prompts."""
    cache = {}

    def get(name: str, max_tokens: int = GREEDY.max_tokens):
        if (name, max_tokens) not in cache:
            path, _ = hf_model_dir(name)
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            cache[name, max_tokens] = _run(path, _prompts(random_prompts), params)[1]
        return cache[name, max_tokens]

    return get


def _spec(method: str, path, k: int = 3, **extra) -> dict:
    return dict(method=method, model=str(path), num_speculative_tokens=k, **extra)


# ---------------------------------------------------------------------- the draft directory


def test_save_then_read_gives_the_same_draft(hf_model_dir, drafts):
    path, _ = hf_model_dir("llama")
    target = load_model(path, device="cpu")
    for method in METHODS:
        out, draft = drafts("llama")[method]
        meta, tensors = read_draft(out)
        assert meta["method"] == method
        assert meta["target"]["hidden_size"] == 64 and meta["target"]["vocab_size"] == VOCAB
        own = draft.own_state_dict()
        assert set(tensors) == set(own)
        # what it borrows from the target is not saved (an exit head's LM head is its own)
        assert ("lm_head.weight" in tensors) == (method == "early_exit")
        assert not any(k.startswith("embed_tokens") for k in tensors)
        loaded = load_draft(out, method, target)
        for name, t in loaded.own_state_dict().items():
            assert torch.equal(t, own[name]), name
    assert json.loads((out / "draft_config.json").read_text())["exit_layer"] == 1
    assert read_draft(drafts("llama")["medusa"][0])[0]["num_heads"] == 4


@pytest.mark.parametrize(
    "spec, error, message",
    [
        (dict(method="medusa", num_speculative_tokens=2), InputError, "needs 'model'"),
        (dict(method="early_exit", num_speculative_tokens=2), InputError, "needs 'exit_layer'"),
        (dict(method="eagle", model="x", num_speculative_tokens=2, verify=False), InputError,
         "'early_exit' only"),
        (dict(method="ngram", num_speculative_tokens=2, exit_layer=1), InputError,
         "'early_exit' only"),
        (dict(method="early_exit", exit_layer=0, num_speculative_tokens=2), InputError,
         "exit_layer must be an int >= 1"),
        (dict(method="early_exit", exit_layer=2, num_speculative_tokens=2), ConfigError,
         "between 1 and 1"),
        ("not_a_draft", ConfigError, "not a draft directory"),
        ("wrong_method", ConfigError, "holds a 'medusa' draft"),
        ("other_target", ConfigError, "trained for a target with hidden_size=32"),
        ("too_few_heads", ConfigError, "has 4 heads"),
        ("other_exit_layer", ConfigError, "reads layer 1's output"),
    ],
)  # fmt: skip
def test_bad_configs_are_refused_with_clear_errors(
    hf_model_dir, drafts, tmp_path, spec, error, message
):
    path, _ = hf_model_dir("llama")
    medusa = drafts("llama")["medusa"][0]
    if spec == "not_a_draft":
        spec = _spec("eagle", path)  # a model directory, not a draft's
    elif spec == "wrong_method":
        spec = _spec("eagle", medusa)
    elif spec == "other_target":
        small = load_model(path, device="cpu").config.replace(hidden_size=32)
        out = save_draft(tmp_path / "d", MedusaHeads(32, 4), small)
        spec = _spec("medusa", out)
    elif spec == "too_few_heads":
        spec = _spec("medusa", medusa, k=5)
    elif spec == "other_exit_layer":
        spec = _spec("early_exit", drafts("llama")["early_exit"][0], exit_layer=2)
    with pytest.raises(error, match=message):
        LLM(str(path), device="cpu", speculative_config=spec)


# ---------------------------------------------------------------------- greedy: lossless


class Recorder:
    """Wraps a proposer's propose(): each sequence's tokens, computed count and proposal."""

    def __init__(self, proposer, calls: list | None = None):
        self.calls, self.propose = [] if calls is None else calls, proposer.propose
        proposer.propose = self

    def __call__(self, seqs, ks, sampler):
        proposals = self.propose(seqs, ks, sampler)
        for seq, k, p in zip(seqs, ks, proposals):
            self.calls.append((list(seq.token_ids), seq.num_computed_tokens, k, p))
        return proposals


@torch.no_grad()
def _reference_proposal(method, target, draft, tokens: list[int], k: int) -> list[int]:
    """What the draft proposes after `tokens` (x_0 .. x_n, x_n not yet through the target),
    in plain torch over the whole sequence: no KV pool, no engine."""
    if method == "early_exit":  # the target cut at the exit layer, greedy
        return _greedy(exit_model(target, draft, draft.exit_layer), tokens, k)
    ids = torch.tensor([tokens])
    hidden = target.hidden_states(ids[:, :-1])  # h_0 .. h_{n-1}
    if method == "medusa":
        return draft(hidden[0, -1], k).argmax(-1).tolist()
    features, out = hidden, []  # eagle: row t reads x_{t+1} and h_t, then its predictions
    for _ in range(k):
        positions = torch.arange(ids.shape[1] - 1)[None]
        predicted = draft(ids[:, 1:], features, positions)
        out.append(int(draft.compute_logits(predicted[0, -1]).argmax()))
        ids = torch.cat([ids, torch.tensor([out[-1:]])], dim=1)
        features = torch.cat([features, predicted[:, -1:]], dim=1)
    return out


@torch.no_grad()
def _greedy(model, tokens: list[int], n: int) -> list[int]:
    """n greedy tokens of a plain model after `tokens`."""
    ids = torch.tensor([tokens])
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(tokens) :].tolist()


@pytest.mark.parametrize("method", METHODS)
def test_proposals_are_the_drafts_and_tokens_the_targets(
    hf_model_dir, random_prompts, drafts, plain, method
):
    """A mixed batch (async plain steps while more than 3 are live), then the same prompts
    again (prefix hits), then a pool of 6 blocks (preemptions): every proposal equals the
    draft's own in plain torch from the target's states (its features found at their slots,
    its K/V caught up after rejections), and the tokens are the plain engine's."""
    path, _ = hf_model_dir("llama")
    prompts, ref = _prompts(random_prompts), plain("llama")
    out, draft = drafts("llama")[method]
    spec = _spec(method, out, disable_by_batch_size=3)
    llm = LLM(str(path), device="cpu", async_scheduling=True, speculative_config=spec)
    recorder = Recorder(llm.engine.core.spec.proposer)
    assert _tokens(llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)) == ref
    again = llm.generate(prompt_token_ids=prompts[::-1], sampling_params=GREEDY)
    assert _tokens(again) == ref[::-1]
    assert llm.engine.block_manager.prefix_cache_hits > 0
    llm.engine.block_manager.check_all_free()
    tight = LLM(str(path), device="cpu", num_kv_blocks=6, max_model_len=96,
                speculative_config=_spec(method, out))  # fmt: skip
    Recorder(tight.engine.core.spec.proposer, recorder.calls)
    big = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    assert _tokens(tight.generate(prompt_token_ids=prompts, sampling_params=big)) == plain(
        "llama", 32
    )
    assert tight.engine.scheduler.num_preemptions > 0
    tight.engine.block_manager.check_all_free()
    target = load_model(path, device="cpu")
    draft.bind(target)
    assert len(recorder.calls) > 30
    for tokens, computed, k, proposal in recorder.calls:
        assert computed == len(tokens) - 1
        assert proposal == _reference_proposal(method, target, draft, tokens, k)
    accepted = sum(e.engine.stats()["spec_decode_num_accepted_tokens"] for e in (llm, tight))
    assert accepted > 0 or method == "eagle"  # a random EAGLE layer is rarely right


@pytest.mark.parametrize("name", ["qwen3", "gpt2", "mixtral"])
def test_greedy_tokens_equal_plain_decoding_for_every_method(
    hf_model_dir, random_prompts, drafts, plain, name
):
    """q/k norms and tied embeddings, LayerNorm and learned positions, MoE layers (EAGLE's
    layer dense): each method's greedy tokens are the plain engine's (llama: above; a
    sliding window: below)."""
    path, _ = hf_model_dir(name)
    prompts = _prompts(random_prompts)
    for method in METHODS:
        llm, out = _run(path, prompts, speculative_config=_spec(method, drafts(name)[method][0]))
        assert out == plain(name), method
        assert llm.engine.stats()["spec_decode_num_drafts"] > 0


WINDOW = 8


def _one_layer_mistral(tmp_path):
    import transformers

    config = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        sliding_window=WINDOW, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # peaked: no near-ties
    model.save_pretrained(tmp_path)
    return tmp_path


def _exact_eagle(path, out):
    """For a one-layer target with a sliding window, the EAGLE draft that IS the target past
    the window: fc passes the token's embedding, the layer and norm are the target's; its
    row t (token x_{t+1}, RoPE at t) attends over the same keys as the target's row t + 1
    (shifted by one) once the window no longer reaches x_0, which the draft never sees."""
    target = load_model(path, device="cpu")
    draft = EagleDraft(target.config).bind(target)
    h = target.config.hidden_size
    with torch.no_grad():
        draft.fc.weight.zero_()
        draft.fc.weight[:, :h].copy_(torch.eye(h))
        draft.layers[0].load_state_dict(target.layers[0].state_dict())
        draft.norm.load_state_dict(target.norm.state_dict())
    return save_draft(out, draft, target.config)


def test_an_eagle_draft_equal_to_the_target_is_always_accepted(tmp_path, random_prompts):
    """The exact EAGLE draft (above) through the engine, prompts longer than the window:
    every greedy proposal is accepted (the shift, the positions, the catch-up of its own K/V
    line up); with a repetition penalty the target turns some down and the tokens are still
    the plain engine's."""
    path = _one_layer_mistral(tmp_path / "target")
    draft = _exact_eagle(path, tmp_path / "eagle")
    prompts = random_prompts((WINDOW + 2, 12, 40, 20), seed=21)
    spec = _spec("eagle", draft, k=4)
    _, ref = _run(path, prompts)
    llm, out = _run(path, prompts, speculative_config=spec)
    assert out == ref
    stats = llm.engine.stats()
    assert stats["spec_decode_acceptance_rate"] == 1.0, stats
    penalty = SamplingParams(temperature=0, repetition_penalty=2.0, max_tokens=16, ignore_eos=True)
    _, ref = _run(path, prompts, penalty)
    llm, out = _run(path, prompts, penalty, speculative_config=spec)
    assert out == ref
    assert 0 < llm.engine.stats()["spec_decode_acceptance_rate"] < 1.0


@pytest.mark.parametrize("method", ["medusa", "eagle"])
def test_graph_buffers_carry_the_hidden_states(
    hf_model_dir, random_prompts, drafts, monkeypatch, method
):
    """The target's steps through its decode and mixed graphs' buffers (each token's hidden
    state written at its slot inside the graph) and EAGLE's through its own (the sampling
    rows' hidden states as a graph output): the same proposals as eager steps (CUDA graphs
    need a GPU: each "graph" runs the eager forward over exactly the staged buffers)."""
    from engine.test_graph_inputs import _fake_graphs, _fake_mixed_graphs

    path, _ = hf_model_dir("qwen3")
    prompts = _prompts(random_prompts)
    spec = _spec(method, drafts("qwen3")[method][0])
    runs, replays = [], Counter()
    for fake in (False, True):
        llm = LLM(str(path), device="cpu", max_num_seqs=64, speculative_config=spec)
        proposer = llm.engine.core.spec.proposer
        recorder = Recorder(proposer)
        runners = [llm.engine.runner] + ([proposer.runner] if method == "eagle" else [])
        for i, runner in enumerate(runners if fake else []):
            holder = type("FakeLLM", (), {"engine": type("E", (), {"runner": runner})})
            _fake_graphs(holder, sample_in_graph=True)
            _fake_mixed_graphs(holder, sample_in_graph=True, sizes=(16, 32, 64))
            g = runner.graph_runner
            for kind, graphs in (("decode", g.graphs), ("mixed", g.mixed)):
                for graph in graphs.values():
                    monkeypatch.setattr(graph, "replay", lambda r=graph.replay, k=(i, kind): (
                        replays.update([k]), r()))  # fmt: skip
        out = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
        llm.engine.block_manager.check_all_free()
        runs.append((_tokens(out), recorder.calls))
    assert runs[1] == runs[0]
    assert replays[(0, "mixed")] >= 5
    if method == "eagle":
        assert replays[(1, "decode")] >= 5 and replays[(1, "mixed")] >= 3, replays


# ---------------------------------------------------------------------- sampling: lossless


@pytest.mark.parametrize("method, wrong", [("medusa", False), ("eagle", False), ("eagle", True)])
def test_sampled_tokens_are_distributed_as_the_targets(
    hf_model_dir, random_prompts, drafts, monkeypatch, method, wrong
):
    """As test_spec_decode's check for the draft model: four tokens at temperature 1 within
    top_k 2 (16 outcomes), the first from the prompt's step and the rest verified from the
    draft's proposals, against the target's exact distribution (total variation within
    sampling noise); an always-accept rule fails the same check."""
    path, hf = hf_model_dir("llama")
    prompt = random_prompts((6,), seed=40)[0]
    exact = _exact_distribution(hf, prompt, 4, top_k=2)
    if wrong:
        monkeypatch.setattr(rejection_sampler, "rejection_sample", _always_accept)
    spec = _spec(method, drafts("llama")[method][0], k=2, disable_by_batch_size=10**6)
    llm = LLM(str(path), device="cpu", speculative_config=spec)
    params = SamplingParams(temperature=1.0, top_k=2, max_tokens=4, ignore_eos=True)
    n = 100 if wrong else 400
    out = llm.generate(prompt_token_ids=[prompt] * n, sampling_params=params)
    tv = _tv(Counter(map(tuple, _tokens(out))), exact)
    if wrong:
        assert tv > 0.3, tv
    else:  # sampling noise alone: about 0.4 * sum(sqrt(p)) / sqrt(n) <= 0.08
        assert 0.05 < llm.engine.stats()["spec_decode_acceptance_rate"] < 0.95
        assert tv < 0.15, tv


# ---------------------------------------------------------------------- kiln train-draft


@pytest.fixture(scope="module")
def peaked_target(hf_model_dir, tmp_path_factory):
    """The tiny llama with a sharper LM head (its next token worth learning) and a
    tokenizer (the corpus goes through it)."""
    path, _ = hf_model_dir("llama")
    model = load_model(path, device="cpu")
    with torch.no_grad():
        model.lm_head.weight.mul_(6)
    out = tmp_path_factory.mktemp("peaked")
    save_model(model, out)
    save_chat_tokenizer(out)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_train_draft_lowers_the_loss_and_its_draft_serves(
    peaked_target, random_prompts, tmp_path, method
):
    """`kiln train-draft` on the bundled corpus (EAGLE: on the target's own continuations):
    the loss falls, and the draft it writes loads and serves lossless."""
    from kiln.cli import main
    from kiln.train.default_model import CORPUS

    text = tmp_path / "corpus.txt"
    text.write_text((CORPUS / "hamlet_gut.txt").read_text()[:20000])
    out = tmp_path / "draft"
    argv = ["train-draft", "--model", str(peaked_target), "--method", method, "--out", str(out),
            "--max-steps", "40", "--seq-len", "32", "--lr", "1e-2", "--min-lr", "1e-3",
            "--warmup-steps", "2", "--log-interval", "1", "--device", "cpu"]  # fmt: skip
    if method == "eagle":
        argv += ["--self-distill", "--num-prompts", "8", "--prompt-len", "8"]
    else:
        argv += ["--corpus", str(text)]
    assert main(argv) == 0
    losses = [json.loads(line).get("loss") for line in (out / "run/log.jsonl").open()]
    losses = [x for x in losses if x is not None]
    assert len(losses) == 40 and sum(losses[-5:]) < 0.9 * sum(losses[:5]), losses
    prompts = _prompts(random_prompts)
    _, ref = _run(peaked_target, prompts)
    llm, got = _run(peaked_target, prompts, speculative_config=_spec(method, out))
    assert got == ref
    assert llm.engine.stats()["spec_decode_num_drafts"] > 0


def test_train_draft_refuses_a_corpus_without_a_tokenizer(hf_model_dir, tmp_path):
    from kiln.cli import main

    path, _ = hf_model_dir("llama")
    argv = ["train-draft", "--model", str(path), "--method", "medusa", "--out", str(tmp_path)]
    assert main(argv) == 2  # "no tokenizer.json ... pass --self-distill"


# ---------------------------------------------------------------------- early exit, unverified


def test_early_exit_without_verification_decodes_as_the_cut_model(
    hf_model_dir, random_prompts, drafts, plain, caplog
):
    """verify: false warns that it is lossy and decodes (prompt included) with the first
    exit_layer layers and the exit head alone: the cut model's greedy tokens, not the
    target's; its KV pool holds those layers only."""
    path, _ = hf_model_dir("llama")
    prompts = _prompts(random_prompts)[:2]
    out, head = drafts("llama")["early_exit"]
    spec = dict(method="early_exit", model=str(out), verify=False)
    with caplog.at_level(logging.WARNING, logger="kiln.engine"):
        llm, got = _run(path, prompts, speculative_config=spec)
    assert "lossy" in caplog.text
    assert llm.engine.runner.kv_cache.data.shape[1] == 1 and llm.engine.core.spec is None
    cut = exit_model(load_model(path, device="cpu"), head, 1)
    assert got == [_greedy(cut, p, GREEDY.max_tokens) for p in prompts]
    assert got != plain("llama")[:2]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama", "qwen3", "gpt2"])
def test_hidden_state_drafts_on_gpu_with_graphs_match_plain_torch_backend(
    hf_model_dir, random_prompts, drafts, name
):
    """Triton kernels and CUDA graphs (the target's graphs writing every hidden state at its
    slot, EAGLE's returning its rows', early exit's over the target's pool), async steps
    between: the plain torch backend's greedy tokens (float32: exact)."""
    path, _ = hf_model_dir(name)
    prompts = _prompts(random_prompts)
    _, ref = run_on_gpu(path, prompts, attention_backend="torch", use_cuda_graph=False,
                        fuse_weights=False)  # fmt: skip
    for method in METHODS:
        spec = _spec(method, drafts(name)[method][0])
        llm, out = run_on_gpu(path, prompts, speculative_config=spec)
        assert llm.engine.runner.graph_runner.mixed
        assert out == ref, method
        spec = dict(spec, disable_by_batch_size=2)  # speculation on and off
        assert run_on_gpu(path, prompts, speculative_config=spec)[1] == ref, method
