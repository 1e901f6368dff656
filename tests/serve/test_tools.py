"""Tool calling through the openai client: forced calls (required, named) parse, streamed or
not; auto calls found by the hermes parser; tool messages round-trip through the template."""

from __future__ import annotations

import json

import pytest

from serve.live_server import start_server

# A Hermes / Qwen-style template: tools in a system turn (their names only: the tiny model's
# context is 256 tokens), calls as <tool_call> blocks, tool answers in <tool_response>.
TOOLS_TEMPLATE = """{%- if tools %}<|im_start|>system
<tools>{% for tool in tools %}{{ tool.function.name }} {% endfor %}</tools><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{{ message.content }}
{%- for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Oslo", "Rome"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
        "tz": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["tz"],
        "additionalProperties": False}},
}  # fmt: skip
TOOLS = [WEATHER, TIME]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tools_model_dir(hf_model_dir, tmp_path_factory):
    import shutil

    from tiny_models import save_chat_tokenizer
    from transformers import PreTrainedTokenizerFast

    src, _ = hf_model_dir("llama")
    out = tmp_path_factory.mktemp("llama_tools")
    shutil.copytree(src, out, dirs_exist_ok=True)
    save_chat_tokenizer(out, all_bytes=True)
    tok = PreTrainedTokenizerFast.from_pretrained(out)
    tok.chat_template = TOOLS_TEMPLATE
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tools_server(tools_model_dir):
    with start_server(tools_model_dir, max_num_seqs=16, async_scheduling=True,
                      tool_call_parser="hermes") as s:  # fmt: skip
        yield s


@pytest.fixture
def tclient(tools_server):
    from openai import OpenAI

    with OpenAI(base_url=f"{tools_server.url}/v1", api_key="x", max_retries=0, timeout=120) as c:
        yield c


def validate(name: str, arguments: str) -> None:
    import jsonschema

    (tool,) = [t for t in TOOLS if t["function"]["name"] == name]
    jsonschema.validate(json.loads(arguments), tool["function"]["parameters"])


def stream_calls(chunks) -> tuple[list[dict], list[str | None], str]:
    """Tool calls joined from delta.tool_calls fragments, the finish reasons, the content."""
    calls: dict[int, dict] = {}
    finishes, content = [], ""
    for chunk in chunks:
        for c in chunk.choices:
            content += c.delta.content or ""
            finishes.append(c.finish_reason)
            for f in c.delta.tool_calls or []:
                if f.id is not None:  # a call's first fragment: id, type, name
                    assert f.index not in calls, "a call's head came twice"
                    calls[f.index] = {"id": f.id, "name": f.function.name, "arguments": ""}
                calls[f.index]["arguments"] += f.function.arguments or ""
    return [calls[i] for i in sorted(calls)], finishes, content


@pytest.mark.parametrize(
    "choice",
    ["required", {"type": "function", "function": {"name": "get_time"}}],
)
def test_forced_calls_parse_whole_and_streamed(tclient, choice):
    kw = dict(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice=choice,
              parallel_tool_calls=False, max_tokens=150, temperature=1.0)  # fmt: skip
    for seed in range(3):
        r = tclient.chat.completions.create(**kw, seed=seed).choices[0]
        assert r.finish_reason == "tool_calls" and len(r.message.tool_calls) == 1
        call = r.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
        if isinstance(choice, dict):
            assert call.function.name == "get_time"
        validate(call.function.name, call.function.arguments)
        calls, finishes, content = stream_calls(
            tclient.chat.completions.create(**kw, seed=seed, stream=True)
        )
        assert content == "" and finishes[-1] == "tool_calls"
        assert [(c["name"], c["arguments"]) for c in calls] == [
            (call.function.name, call.function.arguments)]  # fmt: skip


def test_auto_calls_are_found_by_the_parser(tclient):
    # the tiny model would never write a call by itself: a grammar makes it write one
    text = (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}</tool_call>'
    )
    grammar = "root ::= " + json.dumps("Sure. " + text)
    kw = dict(model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=120, temperature=0,
              extra_body={"structured_outputs": {"grammar": grammar}})  # fmt: skip
    r = tclient.chat.completions.create(**kw).choices[0]
    assert r.finish_reason == "tool_calls" and r.message.content == "Sure. "
    (call,) = r.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo", "days": 2}
    calls, finishes, content = stream_calls(tclient.chat.completions.create(**kw, stream=True))
    assert content == "Sure. " and finishes[-1] == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls] == [
        ("get_weather", call.function.arguments)]  # fmt: skip


def test_no_tool_choice_leaves_the_text_alone(tclient):
    r = tclient.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="none", max_tokens=8,
        temperature=0,
    ).choices[0]  # fmt: skip
    assert r.message.tool_calls in (None, []) and r.finish_reason in ("stop", "length")


def test_tool_round_trip_through_the_template(tclient, tools_server, tools_model_dir):
    """An assistant's call and the tool's answer go back into the template as Hugging Face
    renders them (arguments as objects), and the conversation goes on."""
    import httpx
    from transformers import PreTrainedTokenizerFast

    first = tclient.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=150, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    ).choices[0].message  # fmt: skip
    call = first.tool_calls[0]
    history = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'},
    ]
    got = httpx.post(f"{tools_server.url}/tokenize",
                     json={"messages": history, "tools": TOOLS}, timeout=30).json()  # fmt: skip
    hf = PreTrainedTokenizerFast.from_pretrained(tools_model_dir)
    hf_history = [*MESSAGES, {"role": "assistant", "content": "", "tool_calls": [
        {"id": call.id, "type": "function", "function": {
            "name": call.function.name, "arguments": json.loads(call.function.arguments)}}]},
        history[2]]  # fmt: skip
    want = hf.apply_chat_template(hf_history, tools=TOOLS, add_generation_prompt=True,
                                  tokenize=False)  # fmt: skip
    assert "<tool_response>" in want and call.function.name in want
    assert got["tokens"] == hf.encode(want, add_special_tokens=False)
    second = tclient.chat.completions.create(model="tiny", messages=history, tools=TOOLS,
                                             tool_choice="none", max_tokens=4)  # fmt: skip
    assert second.usage.prompt_tokens == got["count"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice.function.name"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
         "tools.0.function.name"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
         "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
          "type": "nonsense"}}}], "tool_choice": "required"}, "tools"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
          "function": {"name": "f", "arguments": "{oops"}}]}]}, "messages"),
    ],
)  # fmt: skip
def test_bad_tool_requests_are_400(tools_server, body, param):
    import httpx

    r = httpx.post(f"{tools_server.url}/v1/chat/completions",
                   json={"messages": MESSAGES, **body}, timeout=30)  # fmt: skip
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_auto_without_a_parser_is_400(http):
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "tools": TOOLS})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
