"""Tool-call parsers and the streams of forced calls: whole answers, and the same answers fed
a character at a time (fragments must join to the whole, never repeat)."""

from __future__ import annotations

import json

import pytest

from kiln.serve.tools import (
    HermesParser,
    Llama3JsonParser,
    NamedStream,
    RequiredStream,
    merge_fragments,
    required_schema,
)

HERMES = (
    'Let me look. <tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n'
    '</tool_call><tool_call>{"name": "time", "arguments": {"tz": "a;b</"}}</tool_call>'
)
LLAMA = (
    '<|python_tag|>{"name": "weather", "parameters": {"city": "Paris"}}; '
    '{"name": "time", "parameters": {"tz": "a;b"}}'
)


def streamed(stream, text: str) -> tuple[str, list[dict]]:
    content, frags = "", []
    for part in [*text, ""]:
        c, f = stream.feed(part, final=not part)
        content += c
        frags += f
    return content, frags


def test_hermes_finds_every_call_and_keeps_the_text():
    content, calls = HermesParser().parse(HERMES)
    assert content == "Let me look. "
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("weather", {"city": "Paris"}), ("time", {"tz": "a;b</"})]  # fmt: skip
    assert HermesParser().parse("no call <tool") == ("no call <tool", [])
    assert HermesParser().parse("<tool_call>not json</tool_call>")[1] == []


@pytest.mark.parametrize("parser, text", [(HermesParser(), HERMES), (Llama3JsonParser(), LLAMA)])
def test_streamed_calls_join_to_the_whole(parser, text):
    content, calls = parser.parse(text)
    s_content, frags = streamed(parser.stream(), text)
    assert s_content == (content or "")
    merged = merge_fragments(frags)
    assert [f["index"] for f in frags if "id" in f] == list(range(len(calls)))
    assert [(m["function"]["name"], m["function"]["arguments"]) for m in merged] == [
        (c.name, c.arguments) for c in calls]  # fmt: skip


def test_llama3_json_calls_and_plain_text():
    _, calls = Llama3JsonParser().parse(LLAMA)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("weather", {"city": "Paris"}), ("time", {"tz": "a;b"})]  # fmt: skip
    assert Llama3JsonParser().parse("Hello {there}") == ("Hello {there}", [])
    assert Llama3JsonParser().parse('{"not": "a call"}') == ('{"not": "a call"}', [])


def test_forced_streams():
    content, frags = streamed(NamedStream("weather"), '{"city": "Paris"}')
    (call,) = merge_fragments(frags)
    assert content == "" and call["function"] == {"name": "weather",
                                                  "arguments": '{"city": "Paris"}'}  # fmt: skip
    text = '[{"name": "a", "parameters": {"x": "]}"}}, {"name": "b", "parameters": {}}]'
    _, frags = streamed(RequiredStream(), text)
    assert [(m["function"]["name"], json.loads(m["function"]["arguments"]))
            for m in merge_fragments(frags)] == [("a", {"x": "]}"}), ("b", {})]  # fmt: skip


def test_required_schema_accepts_only_the_tools():
    import jsonschema

    x = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    tools = [{"name": "a", "parameters": x}, {"name": "b"}]
    schema = required_schema(tools, parallel=False)
    jsonschema.validate([{"name": "a", "parameters": {"x": 1}}], schema)
    for bad in ([], [{"name": "c", "parameters": {}}], [{"name": "a", "parameters": {"x": "1"}}],
                [{"name": "b", "parameters": {}}] * 2):  # fmt: skip
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
