"""Structured outputs through the official openai client: response_format, vLLM's
structured_outputs and guided_* fields, and the 400s for specs that do not compile."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from serve.live_server import start_server

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z ]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "admin": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "admin", "tags"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe a user."}]


@pytest.fixture(scope="module")
def bytes_model_dir(hf_model_dir, tmp_path_factory):
    """The tiny llama with a BPE that has every byte (grammars must spell digits, braces)."""
    import shutil

    from tiny_models import save_chat_tokenizer

    src, _ = hf_model_dir("llama")
    out = tmp_path_factory.mktemp("llama_bytes_serve")
    shutil.copytree(src, out, dirs_exist_ok=True)
    save_chat_tokenizer(out, all_bytes=True)
    return out


@pytest.fixture(scope="module")
def so_server(bytes_model_dir):
    with start_server(bytes_model_dir, max_num_seqs=64, async_scheduling=True) as s:
        yield s


@pytest.fixture
def so_client(so_server):
    from openai import OpenAI

    with OpenAI(base_url=f"{so_server.url}/v1", api_key="x", max_retries=0, timeout=120) as c:
        yield c


def test_hundred_json_schema_requests_all_validate(so_client):
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "user", "schema": SCHEMA, "strict": True}}

    def ask(seed: int):
        r = so_client.chat.completions.create(
            model="tiny", messages=MESSAGES, response_format=fmt, max_tokens=200,
            temperature=1.0, seed=seed,
        )  # fmt: skip
        return r.choices[0]

    with ThreadPoolExecutor(16) as pool:
        choices = list(pool.map(ask, range(100)))
    assert all(c.finish_reason == "stop" for c in choices), [c.finish_reason for c in choices]
    for c in choices:
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
    assert len({c.message.content for c in choices}) > 50  # sampled, not one answer repeated


@pytest.mark.parametrize(
    "extra",
    [
        {"structured_outputs": {"choice": ["red", "green", "blue sky"]}},
        {"guided_choice": ["red", "green", "blue sky"]},
    ],
)
def test_choice_outputs_are_one_of_the_choices(so_client, extra):
    for seed in range(5):
        r = so_client.completions.create(
            model="tiny", prompt="Color:", max_tokens=20, temperature=1.0, seed=seed,
            extra_body=extra,
        )  # fmt: skip
        assert r.choices[0].text in ("red", "green", "blue sky")


@pytest.mark.parametrize("field", ["structured_outputs", "guided_regex"])
def test_regex_outputs_match_streamed_or_not(so_client, field):
    pattern = r"[A-Z][a-z]{2,5} [0-9]{2}"
    extra = {"structured_outputs": {"regex": pattern}} if field != "guided_regex" else {
        "guided_regex": pattern}  # fmt: skip
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=30, temperature=1.0, seed=3,
              extra_body=extra)  # fmt: skip
    whole = so_client.chat.completions.create(**kw).choices[0].message.content
    chunks = so_client.chat.completions.create(**kw, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert re.fullmatch(pattern, whole) and streamed == whole


def test_json_object_and_grammar(so_client):
    grammar = 'root ::= "(" [0-9] [0-9]? (", " [a-z])? ")"'
    r = so_client.completions.create(
        model="tiny", prompt="{", max_tokens=40, temperature=0,
        extra_body={"structured_outputs": {"grammar": grammar}},
    )  # fmt: skip
    assert re.fullmatch(r"\([0-9]{1,2}(, [a-z])?\)", r.choices[0].text)
    r = so_client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=20, temperature=0,
        response_format={"type": "json_object"},
    )  # fmt: skip
    c = r.choices[0]  # any object; a random model may not close it in 20 tokens
    assert c.message.content.startswith("{")
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.message.content), dict)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
          "schema": {"type": "nonsense"}}}}, "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"structured_outputs": {"regex": "([a-z"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"grammar": "root ::= nope"}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ],
)  # fmt: skip
def test_bad_specs_are_400_naming_the_field(so_server, body, param):
    import httpx

    for path, base in (("/v1/chat/completions", {"messages": MESSAGES}),
                       ("/v1/completions", {"prompt": "x"})):  # fmt: skip
        r = httpx.post(f"{so_server.url}{path}", json={**base, **body}, timeout=30)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
