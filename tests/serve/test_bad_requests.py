"""Every bad request gets an OpenAI-shaped error with the right status, and hurts nobody else."""

from __future__ import annotations

import json

import pytest

COMPLETION = {"model": "tiny", "prompt": "Hello", "max_tokens": 2}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def assert_error(resp, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in resp.text
    if param is not None:
        assert err["param"] == param, err
    return err


def test_malformed_json_is_400(http):
    err = assert_error(http.post("/v1/completions", content=b'{"prompt": "x",'), 400)
    assert "JSON" in err["message"]
    assert_error(http.post("/v1/chat/completions", content=b"[1, 2]"), 400)
    assert_error(http.post("/v1/completions", content=b'{"prompt": NaN}'), 400)


@pytest.mark.parametrize(
    "change, param",
    [
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"n": 0}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"stop": [""]}, "stop.0"),
        ({"seed": 2**64}, "seed"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, -1]}, "prompt.1"),
        ({"prompt": 5}, "prompt"),
        ({"stream": "yes"}, "stream"),
        ({"echo": True, "use_beam_search": True, "n": 2}, "echo"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ],
)
def test_out_of_range_completion_fields_are_400(http, change, param):
    assert_error(http.post("/v1/completions", json={**COMPLETION, **change}), 400, param)


@pytest.mark.parametrize(
    "change, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": 7}]}, "messages.0.content"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ],
)
def test_bad_chat_fields_are_400(http, change, param):
    assert_error(http.post("/v1/chat/completions", json={**CHAT, **change}), 400, param)


def test_prompt_longer_than_context_names_both_lengths(http):
    ids = list(range(5, 5 + 300))
    err = assert_error(http.post("/v1/completions", json={**COMPLETION, "prompt": ids}), 400)
    assert "256" in err["message"] and "300" in err["message"]
    assert err["code"] == "context_length_exceeded"
    err = assert_error(
        http.post("/v1/completions", json={**COMPLETION, "prompt": ids[:250], "max_tokens": 10}),
        400,
        "max_tokens",
    )
    assert "256" in err["message"] and "260" in err["message"]


def test_token_outside_vocab_is_400(http):
    from tiny_models import VOCAB

    err = assert_error(http.post("/v1/completions", json={**COMPLETION, "prompt": [3, VOCAB]}), 400)
    assert str(VOCAB) in err["message"]


def test_unknown_model_is_404(http):
    err = assert_error(http.post("/v1/completions", json={**COMPLETION, "model": "gpt-9"}), 404)
    assert err["code"] == "model_not_found" and "gpt-9" in err["message"]
    assert_error(http.post("/v1/chat/completions", json={**CHAT, "model": "nope"}), 404, "model")


def test_body_over_limit_is_413(http):
    from kiln.serve.api import DEFAULT_MAX_BODY_BYTES

    big = json.dumps({**COMPLETION, "prompt": "x" * DEFAULT_MAX_BODY_BYTES}).encode()
    assert_error(http.post("/v1/completions", content=big), 413)

    def chunked():  # no Content-Length: the limit holds while reading
        for i in range(0, len(big), 2**16):
            yield big[i : i + 2**16]

    assert_error(http.post("/v1/completions", content=chunked()), 413)


def test_unknown_route_and_method_are_openai_shaped(http):
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get("/v1/completions"), 405)


def test_server_still_serves_after_bad_requests(http):
    http.post("/v1/completions", content=b"{{{")
    assert http.get("/health").status_code == 200
    ok = http.post("/v1/completions", json=COMPLETION)
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] > 0


def test_too_many_stop_strings_names_the_limit(http):
    err = assert_error(
        http.post("/v1/completions", json={**COMPLETION, "stop": ["x"] * 10_000}), 400, "stop"
    )
    assert "16" in err["message"]


def test_huge_text_prompt_is_refused_before_tokenizing(http, server):
    limit = server.engine.max_model_len * server.engine.max_token_bytes
    resp = http.post("/v1/completions", json={**COMPLETION, "prompt": "a" * (limit + 1)})
    err = assert_error(resp, 400, "prompt")
    assert err["code"] == "context_length_exceeded" and "characters" in err["message"]


def test_each_prompt_of_a_batch_gets_its_own_room(http, server):
    room = server.engine.max_model_len
    body = {"prompt": [[5] * 4, [5] * (room - 3)], "max_tokens": None, "ignore_eos": True}
    choices = http.post("/v1/completions", json=body).json()["choices"]
    assert [len(c["text"]) > 0 for c in choices] == [True, True]
    assert [c["finish_reason"] for c in choices] == ["length", "length"]


def test_logprobs_json_never_carries_inf_or_nan():
    from kiln.serve.deltas import LOGPROB_FLOOR, Delta, chat_logprobs, completion_logprobs

    d = Delta(0, "ab", [1, 2], [{1: float("-inf"), 3: 0.0}, {2: float("nan")}], None, None)
    decode = str
    legacy = completion_logprobs(decode, d, 2, 0).model_dump_json()
    chat = chat_logprobs(decode, d, 2).model_dump_json()
    for text in (legacy, chat):
        assert "inf" not in text.lower() and "nan" not in text.lower()
        assert str(LOGPROB_FLOOR) in text


def test_prompt_checks_are_the_engines_naming_the_field(http, server):
    from tiny_models import VOCAB

    from kiln.engine.core import check_prompt_ids
    from kiln.errors import InputError

    def engine_says(ids) -> str:
        with pytest.raises(InputError) as e:
            check_prompt_ids(ids, server.engine.max_model_len, VOCAB)
        return str(e.value)

    bad = {**COMPLETION, "prompt": [3, VOCAB]}
    err = assert_error(http.post("/v1/completions", json=bad), 400, "prompt")
    assert err["message"] == engine_says([3, VOCAB]) and err["code"] is None
    err = assert_error(
        http.post("/v1/completions", json={**COMPLETION, "prompt": ""}), 400, "prompt"
    )
    assert err["message"] == engine_says([])
    long = {**CHAT, "messages": [{"role": "user", "content": "to be or not " * 200}]}
    err = assert_error(http.post("/v1/chat/completions", json=long), 400, "messages")
    assert err["code"] == "context_length_exceeded" and "max_model_len is 256" in err["message"]
