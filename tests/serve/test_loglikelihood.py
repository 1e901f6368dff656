"""The log-likelihood API that evaluation harnesses use: echo + logprobs, max_tokens 0, vLLM's
prompt_logprobs, /tokenize, /detokenize, /tokenizer_info; checked against transformers."""

from __future__ import annotations

import pytest
import torch

PROMPT = "To be, or not to be, that is the question"


@pytest.fixture(scope="module")
def hf_logprobs(chat_model_dir):
    """Token ids of PROMPT and transformers' log-softmax at every position (fp32)."""
    import transformers

    import kiln

    ids = kiln.load_tokenizer(chat_model_dir).encode(PROMPT)
    model = transformers.AutoModelForCausalLM.from_pretrained(chat_model_dir).eval()
    with torch.no_grad():
        return ids, model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_echo_logprobs_match_transformers(client, hf_logprobs):
    ids, ref = hf_logprobs
    out = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=1, temperature=0, logprobs=3, echo=True
    )
    c = out.choices[0]
    lp = c.logprobs
    assert c.text.startswith(PROMPT)
    assert len(lp.token_logprobs) == len(ids) + 1  # the prompt, then the generated token
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = [ref[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(want, abs=1e-4)
    for i in range(1, len(ids)):  # the top 3 of the model, plus the prompt's own token
        assert max(lp.top_logprobs[i].values()) == pytest.approx(ref[i - 1].max().item(), abs=1e-4)
        assert 3 <= len(lp.top_logprobs[i]) <= 4
    assert "".join(lp.tokens) == c.text
    assert lp.text_offset[: len(ids)] == sorted(lp.text_offset[: len(ids)])
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 1


def test_max_tokens_zero_echo_scores_the_prompt_only(client, hf_logprobs):
    ids, ref = hf_logprobs
    out = client.completions.create(
        model="tiny", prompt=[ids, ids[:4]], max_tokens=0, temperature=0, logprobs=0, echo=True
    )
    assert [c.index for c in out.choices] == [0, 1]
    first, short = out.choices
    assert first.text == PROMPT and first.finish_reason == "length"
    assert len(first.logprobs.token_logprobs) == len(ids)
    want = [ref[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    assert first.logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert len(short.logprobs.token_logprobs) == 4
    assert out.usage.completion_tokens == 0


def test_streamed_echo_starts_with_the_prompt(client):
    chunks = list(
        client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=3, temperature=0, echo=True, stream=True,
            extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    whole = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=3, temperature=0, echo=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert chunks[0].choices[0].text.startswith(PROMPT)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text


def test_streamed_echo_of_max_tokens_zero_is_the_prompt_alone(client, hf_logprobs):
    ids, _ = hf_logprobs
    chunks = list(
        client.completions.create(
            model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=1, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    choices = [c.choices[0] for c in chunks if c.choices]
    assert "".join(c.text for c in choices) == PROMPT
    assert choices[-1].finish_reason == "length"
    assert sum(len(c.logprobs.token_logprobs) for c in choices) == len(ids)
    assert chunks[-1].usage.completion_tokens == 0


def test_vllm_prompt_logprobs_field(http, hf_logprobs):
    ids, ref = hf_logprobs
    body = dict(model="tiny", prompt=ids, max_tokens=2, temperature=0, prompt_logprobs=2)
    c = http.post("/v1/completions", json=body).json()["choices"][0]
    plp = c["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    for i in range(1, len(ids)):
        got = plp[i][str(ids[i])]["logprob"]
        assert got == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)
        assert 2 <= len(plp[i]) <= 3
    assert c["logprobs"] is None and not c["text"].startswith(PROMPT)


def test_prompt_logprobs_survive_chunked_prefill_and_batching(
    chat_model_dir, hf_logprobs, monkeypatch
):
    from kiln.engine import model_runner
    from kiln.engine.llm import LLM
    from kiln.engine.sampling_params import SamplingParams

    monkeypatch.setattr(model_runner, "PROMPT_LOGPROBS_ROWS", 3)  # the LM head in pieces too
    ids, ref = hf_logprobs
    llm = LLM(str(chat_model_dir), max_num_batched_tokens=8)  # the prompt in 8-token chunks
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=0)
    outs = llm.generate(None, [params, SamplingParams(max_tokens=4)], prompt_token_ids=[ids, ids])
    plp = outs[0].prompt_logprobs
    assert plp[0] is None and [set(d) for d in plp[1:]] == [{t} for t in ids[1:]]
    want = [ref[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    assert [plp[i + 1][ids[i + 1]] for i in range(len(ids) - 1)] == pytest.approx(want, abs=1e-4)
    assert outs[1].prompt_logprobs is None


def test_tokenize_and_detokenize(http, chat_model_dir):
    import kiln

    tok = kiln.load_tokenizer(chat_model_dir)
    r = http.post("/tokenize", json={"prompt": PROMPT, "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode(PROMPT) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 256 and len(r["token_strs"]) == r["count"]
    messages = [{"role": "user", "content": "hi"}]
    r = http.post("/tokenize", json={"messages": messages}).json()
    assert r["tokens"] == tok.apply_chat_template(messages, tokenize=True)
    back = http.post("/detokenize", json={"tokens": tok.encode(PROMPT)}).json()
    assert back == {"prompt": PROMPT}
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and info["chat_template"] == tok.chat_template


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": "a", "prompt_logprobs": 21}, "prompt_logprobs"),
        ("/v1/completions", {"prompt": "a", "echo": True, "use_beam_search": True, "n": 2},
         "echo"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
        ("/detokenize", {"tokens": [10**6]}, "tokens"),
    ],
)  # fmt: skip
def test_bad_log_likelihood_requests_are_400(http, path, body, param):
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
