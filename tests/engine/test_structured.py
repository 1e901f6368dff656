"""Structured outputs in the engine: grammars compiled off the step loop, token masks in the
sampler, under lockstep and async scheduling alike."""

from __future__ import annotations

import json
import re
import threading

import pytest

from kiln.engine.sampling_params import SamplingParams
from kiln.engine.structured import StructuredOutputsParams as S

SCHEMA = {
    "type": "object",
    "properties": {
        # (a pattern, not maxLength: xgrammar 0.2.9's maxLength strings admit raw control
        # characters, which strict JSON parsers refuse)
        "name": {"type": "string", "pattern": "^[A-Za-z ]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model_dir(hf_model_dir, tmp_path_factory):
    """The tiny llama with a BPE that has every byte (grammars must spell digits, braces)."""
    import shutil

    from tiny_models import save_chat_tokenizer

    src, _ = hf_model_dir("llama")
    out = tmp_path_factory.mktemp("llama_bytes")
    shutil.copytree(src, out, dirs_exist_ok=True)
    save_chat_tokenizer(out, all_bytes=True)
    return out


@pytest.fixture(scope="module")
def llm(model_dir):
    from kiln.engine.llm import LLM

    return LLM(str(model_dir))


def params(spec: S, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=kw.pop("max_tokens", 200), structured_outputs=spec, **kw)


def test_outputs_match_their_grammars(llm):
    import jsonschema

    specs = [S(json=SCHEMA), S(regex=r"[0-9]{3}-[a-z]{2}"), S(choice=["yes", "no", "maybe so"]),
             S(grammar='root ::= "a" ("b" | "c")* "d"'),
             S(json=SCHEMA, disable_any_whitespace=True)]  # fmt: skip
    ps = [params(s, temperature=1.0, seed=i) for i, s in enumerate(specs)]
    outs = [o.outputs[0] for o in llm.generate(["Once"] * len(ps), ps, use_tqdm=False)]
    assert all(o.finish_reason == "stop" for o in outs), [o.finish_reason for o in outs]
    jsonschema.validate(json.loads(outs[0].text), SCHEMA)
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", outs[1].text)
    assert outs[2].text in ("yes", "no", "maybe so")
    assert re.fullmatch(r"a[bc]*d", outs[3].text)
    compact = json.loads(outs[4].text)
    assert outs[4].text == json.dumps(compact)  # json.dumps's separators and nothing else


LENGTHS = {"a": {"type": "string", "maxLength": 6},
           "b": {"type": "string", "minLength": 2, "maxLength": 8}}  # fmt: skip


def test_length_bounded_strings_hold_no_raw_control_characters(llm):
    """xgrammar 0.2.9 lets a maxLength string hold a raw tab or newline (invalid JSON): kiln
    narrows such strings' characters, so sampled outputs stay strict JSON."""
    import jsonschema

    schema = {"type": "object", "properties": LENGTHS, "required": ["a", "b"]}
    ps = [params(S(json=schema), temperature=1.5, seed=i) for i in range(6)]
    for out in llm.generate(["Once"] * len(ps), ps, use_tqdm=False):
        value = json.loads(out.outputs[0].text)  # strict: a raw control character fails here
        jsonschema.validate(value, schema)


def _as_pattern(schema):
    """The schema with each length-bounded string spelled as the equivalent pattern."""
    if not isinstance(schema, dict):
        return schema
    out = {k: _as_pattern(v) for k, v in schema.items()}
    if "minLength" in out or "maxLength" in out:
        out["pattern"] = f"^.{{{out.pop('minLength', 0)},{out.pop('maxLength', '')}}}$"
    return out


@pytest.mark.parametrize("any_whitespace", [True, False])
def test_length_bounded_strings_allow_what_their_pattern_allows(model_dir, any_whitespace):
    """At every step of an instance (multi-byte characters, strings at their length bounds),
    a minLength / maxLength schema's mask equals that of the same schema with each bound
    spelled as the pattern ^.{min,max}$ (the reference: strict JSON, but a cost in xgrammar
    that grows with the characters matched); inside a string a raw tab is refused."""
    import torch

    from kiln.engine.structured import GrammarCompiler, GrammarState, fill_bitmask, tokenizer_info
    from kiln.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir).tokenizer
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    compiler = GrammarCompiler(tokenizer_info(model_dir, vocab, {tok.token_to_id("</s>")}))
    items = {"type": "string", "minLength": 1, "maxLength": 2}
    props = {**LENGTHS, "c": {"type": "array", "items": items}}
    schema = {"type": "object", "properties": props, "required": ["a", "b", "c"]}
    specs = [S(json=s, disable_any_whitespace=not any_whitespace)
             for s in (schema, _as_pattern(schema))]  # fmt: skip
    compiled = [compiler.submit(s).result() for s in specs]
    assert "Regex(" not in str(compiled[0].grammar)  # a pattern only in the reference
    states = [GrammarState(c) for c in compiled]
    text = json.dumps({"a": "hé漢 xy", "b": "ab", "c": ["x", "€€"]}, ensure_ascii=False)
    for i, token in enumerate([*tok.encode(text).ids, None]):
        got, want = fill_bitmask(states, vocab, torch.device("cpu"))
        assert torch.equal(got, want), f"masks differ after {i} tokens"
        if token is not None:
            for state in states:
                state.accept(token)
            assert not any(s.failed for s in states)
    inside = GrammarState(compiled[0])
    for token in tok.encode(text[: text.index("h") + 1]).ids:  # {"a": "h
        inside.accept(token)
    bits = fill_bitmask([inside], vocab, torch.device("cpu"))[0]
    allowed = lambda t: bool(bits[t // 32] >> (t % 32) & 1)  # noqa: E731
    (tab,), (x,) = tok.encode("\t").ids, tok.encode("x").ids
    assert allowed(x) and not allowed(tab)
    compiler.shutdown()


def test_ids_past_the_tokenizer_mask_as_when_xgrammar_pads_the_vocabulary(model_dir):
    """A model vocabulary padded past the tokenizer's ids (1,005 more here): kiln gives
    xgrammar the tokenizer's ids only, and its masks equal those of xgrammar padding the
    vocabulary itself (the reference, whose accept_token scans every padded id)."""
    import torch
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    from kiln.engine.structured import GrammarState, fill_bitmask, grammar_of, tokenizer_info
    from kiln.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir).tokenizer
    eos, padded = tok.token_to_id("</s>"), tok.get_vocab_size() + 1005
    info = tokenizer_info(model_dir, padded, {eos})
    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    ref = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=padded, stop_token_ids=[eos])
    assert info.vocab_size == tok.get_vocab_size() and not info.special_token_ids
    grammar = grammar_of(S(json=SCHEMA))
    states = [GrammarState(xgr.GrammarCompiler(i).compile_grammar(grammar)) for i in (info, ref)]
    text = json.dumps({"name": "Ann", "age": 7, "role": "user"})
    for i, token in enumerate([*tok.encode(text).ids, eos, None]):
        got, want = fill_bitmask(states, padded, torch.device("cpu"))
        assert torch.equal(got, want), f"masks differ after {i} tokens"
        if token is not None:
            for state in states:
                state.accept(token)
    assert all(s.matcher.is_terminated() and not s.failed for s in states)


def test_unconstrained_requests_are_unchanged_beside_constrained_ones(llm):
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = llm.generate(["Once"], greedy, use_tqdm=False)[0].outputs[0].token_ids
    mixed = llm.generate(["Once", "Once"], [greedy, params(S(json=SCHEMA), temperature=0)],
                         use_tqdm=False)  # fmt: skip
    assert mixed[0].outputs[0].token_ids == alone
    json.loads(mixed[1].outputs[0].text)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_greedy_structured_output_is_the_same_under_async_scheduling(model_dir, async_scheduling):
    from kiln.engine.llm import LLM

    ref = LLM(str(model_dir), async_scheduling=False)
    llm = LLM(str(model_dir), async_scheduling=async_scheduling)
    ps = [params(S(json=SCHEMA), temperature=0), params(S(regex="[a-z]{4,9}"), temperature=0),
          SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
          params(S(choice=["one", "two"]), temperature=0, n=2, seed=1)]  # fmt: skip
    want = [[c.text for c in o.outputs] for o in ref.generate(["Hi"] * 4, ps, use_tqdm=False)]
    got = [[c.text for c in o.outputs] for o in llm.generate(["Hi"] * 4, ps, use_tqdm=False)]
    assert got == want
    json.loads(got[0][0])


def test_a_grammar_that_cannot_finish_ends_by_length(llm):
    out = llm.generate(["Once"], params(S(regex="[a-z]{40}"), max_tokens=5), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length"
    assert re.fullmatch("[a-z]+", out.outputs[0].text)


@pytest.mark.parametrize(
    "spec, param",
    [
        (dict(json='{"type": "object", '), "structured_outputs.json"),
        (dict(json={"type": "nonsense"}), "structured_outputs.json"),
        (dict(regex="([a-z"), "structured_outputs.regex"),
        (dict(grammar="root ::= undefined_rule"), "structured_outputs.grammar"),
        (dict(choice=[]), "structured_outputs.choice"),
        (dict(json=SCHEMA, regex="a"), "structured_outputs"),
    ],
)
def test_bad_specs_are_input_errors_naming_the_field(llm, spec, param):
    from kiln.errors import InputError

    with pytest.raises(InputError) as e:
        llm.generate(["Once"], params(S(**spec)), use_tqdm=False)
    assert e.value.param == param


def test_a_slow_compile_does_not_stall_other_requests(model_dir, monkeypatch):
    from kiln.engine.core import EngineCore
    from kiln.engine.structured import GrammarCompiler

    release = threading.Event()
    compile_ = GrammarCompiler._compile

    def slow(self, p):
        release.wait(30)
        return compile_(self, p)

    monkeypatch.setattr(GrammarCompiler, "_compile", slow)
    core = EngineCore(str(model_dir))
    core.add_request("json", [5, 6, 7], params(S(json=SCHEMA), temperature=0))
    core.add_request("free", [5, 6, 7], SamplingParams(max_tokens=8, ignore_eos=True))
    got: dict[str, list[int]] = {"json": [], "free": []}
    while "free" in core.requests:
        for d in core.step():
            got[d.request_id] += d.new_token_ids
    assert len(got["free"]) == 8 and got["json"] == []  # ran while the grammar compiled
    release.set()
    while core.has_work():
        for d in core.step():
            got[d.request_id] += d.new_token_ids
    assert got["json"] and core.block_manager.num_free_blocks == core.block_manager.num_blocks


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bitmask_kernel_matches_reference(device, dtype):
    import torch

    from kiln.engine.structured import apply_bitmask, apply_bitmask_ref

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 1000, generator=g).to(getattr(torch, dtype)).to(device)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (7, 32), dtype=torch.int32, generator=g)
    bitmask[3] = -1  # a row that allows everything
    want, got = logits.clone(), logits.clone()
    apply_bitmask_ref(want, bitmask.to(device))
    apply_bitmask(got, bitmask.to(device))
    assert torch.equal(want, got)
    allowed = (bitmask[0, :, None] >> torch.arange(32) & 1).flatten()[:1000]  # bit v: token v
    assert torch.equal(torch.isinf(want[0]).cpu(), allowed == 0)
    assert torch.equal(want[3], logits[3])


@pytest.mark.gpu
def test_structured_outputs_under_cuda_graphs_and_async_scheduling(model_dir):
    """On a GPU (Triton ops, CUDA graphs, async scheduling) the masks act in sampling graphs:
    greedy outputs equal the eager, lockstep, torch-ops engine's, and they parse."""
    from kiln.engine.llm import LLM

    ps = [params(S(json=SCHEMA), temperature=0), params(S(regex="[a-z]{4,9}"), temperature=0),
          SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
          params(S(choice=["one", "two"]), temperature=0)] * 8  # fmt: skip
    ref = LLM(str(model_dir), device="cuda", use_cuda_graph=False, async_scheduling=False,
              attention_backend="torch")  # fmt: skip
    fast = LLM(str(model_dir), device="cuda")
    assert fast.engine.core.async_scheduling and fast.engine.runner.graph_runner.graphs
    want = [o.outputs[0].text for o in ref.generate(["Hi"] * len(ps), ps)]
    got = [o.outputs[0].text for o in fast.generate(["Hi"] * len(ps), ps)]
    assert got == want
    json.loads(got[0])
    # the masks sampled in graphs of their own (one per forward graph the grammar steps ran)
    assert any(kind == "decode" for kind, _ in fast.engine.runner.graph_runner.mask_graphs)
    # prompts of many lengths under a small token budget: chunked prefills beside decodes
    prompts = ["Hi " * n for n in range(1, 33)]
    small = dict(max_num_batched_tokens=64, max_num_seqs=16)
    ref = LLM(str(model_dir), device="cuda", use_cuda_graph=False, async_scheduling=False,
              attention_backend="torch", **small)  # fmt: skip
    fast = LLM(str(model_dir), device="cuda", **small)
    want = [o.outputs[0].text for o in ref.generate(prompts, ps)]
    got = [o.outputs[0].text for o in fast.generate(prompts, ps)]
    assert got == want
    assert any(kind == "mixed" for kind, _ in fast.engine.runner.graph_runner.mask_graphs)


def test_a_batch_of_live_rows_fills_as_row_by_row(model_dir):
    """Past BATCH_FILL_MIN_ROWS live rows, xgrammar's BatchGrammarMatcher fills the masks (on
    its threads, into a block of the tokenizer's width copied into the model's wider rows):
    the same bits as filling each row alone, beside rows without a grammar, terminated and
    failed rows, and states at different places in their grammars."""
    import numpy as np
    import torch

    from kiln.engine import structured
    from kiln.engine.structured import GrammarCompiler, GrammarState, fill_bitmask, tokenizer_info
    from kiln.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir).tokenizer
    eos, vocab = tok.token_to_id("</s>"), tok.get_vocab_size() + 100  # 4 words past its ids
    compiler = GrammarCompiler(tokenizer_info(model_dir, vocab, {eos}))
    compiled = compiler.submit(S(json=SCHEMA)).result()
    ids = tok.encode(json.dumps({"name": "Ann", "age": 7, "role": "user"})).ids
    states = []
    for n in range(0, len(ids), 2):  # live rows at every other place in the instance
        states.append(GrammarState(compiled))
        states[-1].catch_up(ids[:n])
    done, failed = GrammarState(compiled), GrammarState(compiled)
    done.catch_up([*ids, eos])
    failed.accept(tok.encode("x").ids[0])  # not JSON: only EOS from here
    assert done.matcher.is_terminated() and failed.failed
    states[1:1] = [None, done, failed]
    assert sum(s is not None and s.live() for s in states) >= structured.BATCH_FILL_MIN_ROWS
    got = fill_bitmask(states, vocab, torch.device("cpu")).numpy()
    want = np.full_like(got, -1)
    for row, state in zip(want, states):
        if state is not None:
            state.fill(row)
    assert np.array_equal(got, want)
    compiler.shutdown()


def test_a_batch_of_accepts_is_row_by_row(model_dir):
    """accept_tokens (one BatchGrammarMatcher call from BATCH_FILL_MIN_ROWS live states)
    leaves every state where accepting its token alone does: live rows at different places,
    a token outside the grammar (failed), a terminated and a failed row (ignored)."""
    from kiln.engine import structured
    from kiln.engine.structured import GrammarCompiler, GrammarState, accept_tokens, tokenizer_info
    from kiln.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir).tokenizer
    eos, vocab = tok.token_to_id("</s>"), tok.get_vocab_size()
    compiler = GrammarCompiler(tokenizer_info(model_dir, vocab, {eos}))
    compiled = compiler.submit(S(json=SCHEMA)).result()
    ids = tok.encode(json.dumps({"name": "Ann", "age": 7, "role": "user"})).ids
    bad = tok.encode("x").ids[0]

    def states_and_tokens():
        states, tokens = [], []
        for n in range(0, len(ids) - 1, 2):
            states.append(GrammarState(compiled))
            states[-1].catch_up(ids[:n])
            tokens.append(ids[n] if n != 4 else bad)  # row 2 takes a token outside the grammar
        done, failed = GrammarState(compiled), GrammarState(compiled)
        done.catch_up([*ids, eos])
        failed.accept(bad)
        return [*states, done, failed], [*tokens, eos, eos]

    batch, tokens = states_and_tokens()
    alone, _ = states_and_tokens()
    assert sum(s.live() for s in batch) >= structured.BATCH_FILL_MIN_ROWS
    accept_tokens(batch, tokens)
    for state, token in zip(alone, tokens):
        state.accept(token)
    got = [(s.num_accepted, s.failed, s.matcher.is_terminated()) for s in batch]
    assert got == [(s.num_accepted, s.failed, s.matcher.is_terminated()) for s in alone]
    assert got[2][1] and not got[0][1]
    assert [s.matcher.find_jump_forward_string() for s in batch if s.live()] == [
        s.matcher.find_jump_forward_string() for s in alone if s.live()
    ]
    compiler.shutdown()
