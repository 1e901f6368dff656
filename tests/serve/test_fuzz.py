"""Hypothesis-made request bodies: never a 500, never a hang, the server healthy afterwards."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-3, 12)
    | st.sampled_from([2**31, 2**63, 2**64, -(2**63) - 1])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
GARBAGE = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
TEXT = st.text(max_size=24)
MESSAGES = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "bot"]), "content": TEXT}
    ),
    max_size=3,
)
# per field: values near and just past the edges of what is valid
PLAUSIBLE = {
    "model": st.sampled_from(["tiny", "other"]),
    "prompt": TEXT | st.lists(st.integers(-1, 400), max_size=8) | st.lists(TEXT, max_size=3),
    "messages": MESSAGES,
    "max_tokens": st.integers(-1, 8),
    "max_completion_tokens": st.integers(-1, 8),
    "n": st.integers(0, 3),
    "best_of": st.integers(0, 3),
    "temperature": st.floats(-0.5, 2.5),
    "top_p": st.floats(-0.1, 1.1),
    "top_k": st.integers(-2, 500),
    "min_p": st.floats(-0.1, 1.1),
    "presence_penalty": st.floats(-2.5, 2.5),
    "frequency_penalty": st.floats(-2.5, 2.5),
    "repetition_penalty": st.floats(-0.5, 3),
    "seed": st.integers(-(2**64), 2**64),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=3),
    "stop_token_ids": st.lists(st.integers(-1, 400), max_size=3),
    "logprobs": st.integers(-1, 21) | st.booleans(),
    "top_logprobs": st.integers(-1, 21),
    "min_tokens": st.integers(-1, 6),
    "ignore_eos": st.booleans(),
    "stream": st.booleans(),
    "echo": st.booleans(),
    "skip_special_tokens": st.booleans(),
    "use_beam_search": st.booleans(),
    "length_penalty": st.floats(-0.5, 3),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}
BASE = st.sampled_from(
    [
        {},
        {"prompt": "Hello", "max_tokens": 3},
        {"prompt": [5, 6], "max_tokens": 2, "stream": True},
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True},
    ]
)
FIELD = st.sampled_from(sorted(PLAUSIBLE))
BODIES = st.builds(
    lambda base, plausible, garbage: {**base, **dict(plausible), **garbage},
    BASE,
    st.lists(FIELD.flatmap(lambda f: st.tuples(st.just(f), PLAUSIBLE[f])), max_size=5),
    st.just({}) | st.dictionaries(FIELD, GARBAGE, max_size=2),
)


def check(resp: httpx.Response, lines: list[str]) -> None:
    assert resp.status_code < 500, resp.text
    if resp.status_code >= 400:
        err = json.loads("".join(lines))["error"]
        assert set(err) == {"message", "type", "param", "code"}
    elif resp.headers["content-type"].startswith("text/event-stream"):
        assert lines[-1] == "data: [DONE]"


def post(http: httpx.Client, path: str, content: bytes) -> None:
    with http.stream("POST", path, content=content) as resp:
        lines = [line for line in resp.iter_lines() if line]  # bounded by max_tokens and timeout
        check(resp, lines)


@pytest.fixture(scope="module")
def fuzz_http(server):
    with httpx.Client(base_url=server.url, timeout=httpx.Timeout(30.0)) as c:
        yield c


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=BODIES, chat=st.booleans())
def test_fuzzed_bodies_never_500(fuzz_http, body, chat):
    # the server must cap generation itself: an unbounded request would show as a timeout
    content = json.dumps(body, allow_nan=True).encode()
    post(fuzz_http, "/v1/chat/completions" if chat else "/v1/completions", content)


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(raw=st.binary(max_size=64))
def test_fuzzed_bytes_never_500(fuzz_http, raw):
    post(fuzz_http, "/v1/completions", raw)


def test_healthy_after_fuzz(fuzz_http):
    assert fuzz_http.get("/health").status_code == 200
    ok = fuzz_http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200
