"""The agent: JSON schemas from type hints, the safe calculator, the tool loop's dispatch,
error recovery and step limit (a scripted stub model), memory's summary window, and one
forced tool call through kiln's own server."""

from __future__ import annotations

import json
from typing import Literal

import pytest

from apps.stub_server import StubServer
from kiln.apps.agent import Agent, Memory, ToolRegistry, calculator, rag_tool, tool_from_function
from kiln.apps.client import OpenAIClient


def test_schema_from_type_hints():
    def lookup(city: str, days: int, units: Literal["C", "F"] = "C",
               tags: list[str] | None = None) -> str:  # fmt: skip
        """Forecast for a city."""
        return city

    t = tool_from_function(lookup)
    assert t.spec()["function"]["description"] == "Forecast for a city."
    assert t.parameters == {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                       "units": {"enum": ["C", "F"]},
                       "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["city", "days"],
    }  # fmt: skip


@pytest.mark.parametrize(
    "expr, want",
    [
        ("2 + 3 * 4", "14"),
        ("(1 + 2) ** 3 / 9", "3"),
        ("sqrt(16) + max(1, 5)", "9"),
        ("-2.5 * 2", "-5"),
        ("10 // 3 + 10 % 3", "4"),
    ],  # fmt: skip
)
def test_calculator(expr, want):
    assert calculator(expr) == want


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('true')",
        "open('/etc/passwd')",
        "(1).__class__",
        "9 ** 9 ** 9",
        "x + 1",
        "lambda: 1",
    ],  # fmt: skip
)
def test_calculator_refuses_anything_but_arithmetic(expr):
    with pytest.raises(ValueError):
        calculator(expr)


def call(name: str, args: dict, id: str = "c1") -> dict:
    return {"id": id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)}}  # fmt: skip


def test_loop_dispatches_tools_and_recovers_from_errors():
    def flaky(n: int) -> str:
        """Fails on odd numbers."""
        if n % 2:
            raise RuntimeError(f"{n} is odd")
        return f"ok {n}"

    script = iter([
        {"tool_calls": [call("flaky", {"n": 3})]},
        {"tool_calls": [call("nope", {}), call("calculator", {"expression": "6*7"}, "c2")]},
        {"tool_calls": [call("flaky", {"n": 4})]},
        {"content": "done: 42"},
    ])  # fmt: skip
    with StubServer(chat=lambda req: next(script)) as stub, OpenAIClient(stub.url) as client:
        result = Agent(client, ToolRegistry([flaky, calculator]), memory=Memory(20)).run("go")
    assert result.stopped == "answer" and result.answer == "done: 42"
    assert [s.result for s in result.steps] == [
        "error: RuntimeError: 3 is odd",
        "error: no tool named 'nope'; the tools are flaky, calculator", "42", "ok 4"]  # fmt: skip
    # the model saw each result, as a tool message answering its call
    second = stub.requests[1][1]["messages"]
    assert second[-1] == {"role": "tool", "tool_call_id": "c1",
                          "content": "error: RuntimeError: 3 is odd"}  # fmt: skip
    assert [t["function"]["name"] for t in stub.requests[0][1]["tools"]] == ["flaky", "calculator"]


def test_bad_arguments_are_reported_to_the_model():
    tools = ToolRegistry([calculator])
    assert tools.call("calculator", "{oops").startswith("error: the arguments are not JSON")
    assert "missing arguments ['expression']" in tools.call("calculator", "{}")
    assert "unknown arguments ['x']" in tools.call("calculator", '{"expression": "1", "x": 2}')


def test_step_limit_stops_a_model_that_never_answers():
    endless = {"tool_calls": [call("calculator", {"expression": "1+1"})]}
    with StubServer(chat=lambda req: endless) as stub, OpenAIClient(stub.url) as client:
        result = Agent(client, ToolRegistry([calculator]), max_steps=3).run("loop")
    assert result.stopped == "max_steps" and len(result.steps) == 3
    assert len(stub.requests) == 3


def test_memory_keeps_a_window_and_summarizes_the_rest():
    def chat(req):
        prompt = req["messages"][-1]["content"]
        if prompt.startswith("Update the summary"):
            return {"content": "user's name is Ada" if "Ada" in prompt else "nothing"}
        return {"content": "noted"}

    with StubServer(chat=chat) as stub, OpenAIClient(stub.url) as client:
        agent = Agent(client, ToolRegistry([calculator]), memory=Memory(window=4))
        agent.run("My name is Ada.")
        for i in range(3):
            agent.run(f"filler {i}")
    assert len(agent.memory.recent) <= 4 and agent.memory.summary == "user's name is Ada"
    turns = [r["messages"] for _, r in stub.requests if "tools" in r]
    last = turns[-1]
    assert "Summary of the conversation so far: user's name is Ada" in last[0]["content"]


def test_memory_never_starts_with_a_tool_answer():
    memory = Memory(window=2)
    memory.add({"role": "user", "content": "q"})
    memory.add({"role": "assistant", "content": "", "tool_calls": [call("t", {})]})
    memory.add({"role": "tool", "tool_call_id": "c1", "content": "r"})
    assert memory.recent[0]["role"] != "tool"


def test_rag_tool_returns_cited_passages(plays_dir):
    from kiln.apps.documents import load_documents
    from kiln.apps.rag import ChunkConfig, RagIndex

    index = RagIndex.build(load_documents(plays_dir / "macbeth_gut.txt"), ChunkConfig())
    out = ToolRegistry([rag_tool(index)]).call("search_documents",
                                               '{"query": "toil and trouble"}')  # fmt: skip
    assert out.startswith("[1] (macbeth_gut.txt:") and "Double, double" in out


def test_forced_tool_call_through_kiln_server(kiln_server):
    """kiln serve's named tool_choice yields a call that dispatches (the tiny model picks the
    arguments; the loop must turn whatever it gets into a tool answer for the model)."""
    forced = {"type": "function", "function": {"name": "calculator"}}
    with OpenAIClient(kiln_server.url) as client:
        agent = Agent(client, ToolRegistry([calculator]), max_steps=1, tool_choice=forced,
                      max_tokens=24, temperature=0.0)  # fmt: skip
        result = agent.run("What is 2+2?")
    assert result.stopped == "max_steps" and result.steps[0].tool == "calculator"
    assert isinstance(result.steps[0].result, str)
