"""RequestOutputKind: CUMULATIVE, DELTA and FINAL_ONLY describe the same generation."""

from dataclasses import replace

import pytest

from kiln.engine import SamplingParams
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.sampling_params import RequestOutputKind

KINDS = list(RequestOutputKind)


def _run(engine: LLMEngine, prompt, params: SamplingParams, kind) -> list:
    engine.add_request(kind.name, prompt_token_ids=prompt, params=replace(params, output_kind=kind))
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == kind.name]
    engine.block_manager.check_all_free()
    return outs


def _joined(outs) -> dict[int, tuple[str, list[int], list, str]]:
    """Each completion's text, token ids and logprobs, concatenated over delta outputs."""
    got: dict[int, list] = {}
    for o in outs:
        for c in o.outputs:
            text, ids, lps, _ = got.get(c.index, ("", [], [], None))
            got[c.index] = (text + c.text, ids + c.token_ids, lps + (c.logprobs or []),
                            c.finish_reason)  # fmt: skip
    return got


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2),
        SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=["\u0105\u0106"]),
    ],
    ids=["greedy-logprobs", "n2-seeded", "stop-string"],
)
def test_delta_outputs_add_up_to_the_cumulative_one(model_with_tokenizer, random_prompts, params):
    path, _ = model_with_tokenizer
    engine = LLMEngine(str(path), device="cpu", max_model_len=128)
    prompt = random_prompts((9,), seed=4)[0]
    runs = {kind: _run(engine, prompt, params, kind) for kind in KINDS}
    cumulative = runs[RequestOutputKind.CUMULATIVE]
    assert len(runs[RequestOutputKind.FINAL_ONLY]) == 1
    assert runs[RequestOutputKind.FINAL_ONLY][0].finished
    assert [o.finished for o in runs[RequestOutputKind.DELTA]][-1]
    final = {c.index: (c.text, c.token_ids, c.logprobs or [], c.finish_reason)
             for c in cumulative[-1].outputs}  # fmt: skip
    assert len(final) == params.n
    assert _joined(runs[RequestOutputKind.DELTA]) == final
    assert _joined(runs[RequestOutputKind.FINAL_ONLY]) == final
    # cumulative outputs only grow; deltas never repeat a token
    lens = [sum(len(c.token_ids) for c in o.outputs) for o in cumulative]
    assert lens == sorted(lens)
    deltas = runs[RequestOutputKind.DELTA]
    assert sum(len(c.token_ids) for o in deltas for c in o.outputs) == sum(
        len(v[1]) for v in final.values()
    )


def test_stop_string_found_by_the_output_processor_ends_the_sequence_in_the_core(
    model_with_tokenizer, random_prompts
):
    path, _ = model_with_tokenizer
    engine = LLMEngine(str(path), device="cpu", max_model_len=128)
    prompt = random_prompts((9,), seed=4)[0]
    free = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    text = _run(engine, prompt, free, RequestOutputKind.FINAL_ONLY)[0].outputs[0].text
    stop = text[5:7]
    params = replace(free, stop=[stop])
    out = _run(engine, prompt, params, RequestOutputKind.DELTA)
    joined = _joined(out)[0]
    assert joined[0] == text[: text.index(stop)]
    assert out[-1].outputs[-1].finish_reason == "stop"
    assert out[-1].outputs[-1].stop_reason == stop
    assert not engine.core.requests  # the core let go of it as well
