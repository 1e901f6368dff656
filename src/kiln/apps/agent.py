"""A tool-using agent over the chat API's `tools`: a registry whose JSON-schema arguments come
from Python type hints, a function-calling (ReAct) loop with a step limit in which a tool's
error goes back to the model as the tool's answer, and a memory of a running summary plus a
window of recent turns. Two tools: a safe calculator and a RAG index search."""

from __future__ import annotations

import ast
import inspect
import json
import math
import operator
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kiln.errors import InputError

if TYPE_CHECKING:
    from kiln.apps.client import OpenAIClient

JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}


def json_schema(hint: Any) -> dict[str, Any]:
    """The JSON schema of a Python type hint (str, int, float, bool, list[X], Literal, X | None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in JSON_TYPES:
        return {"type": JSON_TYPES[hint]}
    if origin is list:
        return {"type": "array", "items": json_schema(args[0]) if args else {}}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return json_schema(inner[0])
        return {"anyOf": [json_schema(a) for a in inner]}
    raise TypeError(f"no JSON schema for the type hint {hint!r}")


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # a JSON schema of an object
    fn: Callable[..., Any]

    def spec(self) -> dict[str, Any]:
        """The chat API's `tools` entry."""
        return {"type": "function", "function": {"name": self.name,
                "description": self.description, "parameters": self.parameters}}  # fmt: skip


def tool_from_function(fn: Callable[..., Any], name: str | None = None) -> Tool:
    """A Tool whose arguments are `fn`'s parameters (type hints -> JSON schema; parameters
    without a default are required) and whose description is its docstring."""
    hints = typing.get_type_hints(fn)
    props, required = {}, []
    for p in inspect.signature(fn).parameters.values():
        if p.name not in hints:
            raise TypeError(f"tool {fn.__name__}: parameter {p.name!r} has no type hint")
        props[p.name] = json_schema(hints[p.name])
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
    schema = {"type": "object", "properties": props, "required": required}
    doc = inspect.getdoc(fn) or ""
    return Tool(name or fn.__name__, doc, schema, fn)


class ToolRegistry:
    """Tools by name; `call` runs one from the model's JSON arguments and always returns text
    (a bad call or a raising tool gives an "error: ..." text for the model to read)."""

    def __init__(self, tools: list[Callable[..., Any] | Tool] = ()):
        self.tools: dict[str, Tool] = {}
        for t in tools:
            self.register(t)

    def register(self, fn: Callable[..., Any] | Tool) -> Callable[..., Any] | Tool:
        """Add a tool (usable as a decorator)."""
        t = fn if isinstance(fn, Tool) else tool_from_function(fn)
        self.tools[t.name] = t
        return fn

    def specs(self) -> list[dict[str, Any]]:
        return [t.spec() for t in self.tools.values()]

    def call(self, name: str, arguments: str) -> str:
        tool = self.tools.get(name)
        if tool is None:
            return f"error: no tool named {name!r}; the tools are {', '.join(self.tools)}"
        try:
            args = json.loads(arguments or "{}")
        except ValueError as e:
            return f"error: the arguments are not JSON ({e})"
        if not isinstance(args, dict):
            return "error: the arguments must be a JSON object"
        missing = [k for k in tool.parameters["required"] if k not in args]
        unknown = [k for k in args if k not in tool.parameters["properties"]]
        if missing or unknown:
            return f"error: missing arguments {missing}, unknown arguments {unknown}"
        try:
            result = tool.fn(**args)
        except Exception as e:  # any failure is the model's to read and recover from
            return f"error: {type(e).__name__}: {e}"
        return result if isinstance(result, str) else json.dumps(result)


# ---- memory --------------------------------------------------------------------------------


SUMMARY_PROMPT = """Update the summary of a conversation with the turns below. Keep names,
numbers, decisions and open questions; at most a short paragraph.

Summary so far: {summary}

Turns:
{turns}"""


@dataclass
class Memory:
    """A conversation's memory: the last `window` messages verbatim and a running summary of
    the older ones (folded in by the chat model as they leave the window)."""

    window: int = 8
    summary: str = ""
    recent: list[dict[str, Any]] = field(default_factory=list)

    def add(self, message: dict[str, Any], client: OpenAIClient | None = None) -> None:
        self.recent.append(message)
        if len(self.recent) <= self.window:
            return
        # a tool answer must follow its call, so the cut never leaves a tool message first
        cut = len(self.recent) - self.window
        while cut < len(self.recent) and self.recent[cut]["role"] == "tool":
            cut += 1
        old, self.recent = self.recent[:cut], self.recent[cut:]
        if client is not None:
            turns = "\n".join(f"{m['role']}: {m.get('content') or m.get('tool_calls')}"
                              for m in old)  # fmt: skip
            self.summary = client.complete_text(
                SUMMARY_PROMPT.format(summary=self.summary or "(none)", turns=turns)
            )

    def messages(self, system: str) -> list[dict[str, Any]]:
        """The prompt: the system message (with the summary, if any), then the recent turns."""
        if self.summary:
            system = f"{system}\n\nSummary of the conversation so far: {self.summary}"
        return [{"role": "system", "content": system}, *self.recent]


# ---- the loop ------------------------------------------------------------------------------


@dataclass
class Step:
    tool: str
    arguments: str
    result: str


@dataclass
class AgentResult:
    answer: str
    steps: list[Step]
    stopped: str  # "answer" or "max_steps"


class Agent:
    """The function-calling loop: ask the model with the tools; run each tool call it makes and
    answer it with a tool message; stop at a message without tool calls, or after `max_steps`
    rounds of calls."""

    def __init__(
        self,
        client: OpenAIClient,
        tools: ToolRegistry,
        system: str = "You are a helpful assistant. Use the tools when they help.",
        max_steps: int = 8,
        memory: Memory | None = None,
        **params: Any,
    ):
        if max_steps < 1:
            raise InputError(f"max_steps must be >= 1, got {max_steps}")
        self.client, self.tools, self.system, self.max_steps = client, tools, system, max_steps
        self.memory = memory if memory is not None else Memory()
        self.params = params

    def run(self, user: str) -> AgentResult:
        """One user turn, to its answer (the turn stays in memory for the next)."""
        self.memory.add({"role": "user", "content": user}, self.client)
        steps: list[Step] = []
        for _ in range(self.max_steps):
            message = self.client.chat(self.memory.messages(self.system),
                                       tools=self.tools.specs(), **self.params)  # fmt: skip
            calls = message.get("tool_calls") or []
            turn = {"role": "assistant", "content": message.get("content") or ""}
            if not calls:
                self.memory.add(turn, self.client)
                return AgentResult(turn["content"], steps, "answer")
            self.memory.add({**turn, "tool_calls": calls}, self.client)
            for call in calls:
                fn = call["function"]
                result = self.tools.call(fn["name"], fn.get("arguments", ""))
                steps.append(Step(fn["name"], fn.get("arguments", ""), result))
                self.memory.add({"role": "tool", "tool_call_id": call.get("id", ""),
                                 "content": result}, self.client)  # fmt: skip
        return AgentResult(f"stopped after {self.max_steps} steps without an answer", steps,
                           "max_steps")  # fmt: skip


# ---- tools ---------------------------------------------------------------------------------

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}  # fmt: skip
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {"sqrt": math.sqrt, "log": math.log, "exp": math.exp, "sin": math.sin,
              "cos": math.cos, "tan": math.tan, "abs": abs, "round": round, "min": min,
              "max": max}  # fmt: skip
_CONSTANTS = {"pi": math.pi, "e": math.e}


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 1000:
            raise ValueError("exponent too large (at most 1000)")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in _FUNCTIONS and not node.keywords):  # fmt: skip
        return _FUNCTIONS[node.func.id](*(_evaluate(a) for a in node.args))
    raise ValueError(f"unsupported expression: {ast.unparse(node)!r}")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression: numbers, + - * / // % **, parentheses, pi, e, and
    sqrt, log, exp, sin, cos, tan, abs, round, min, max."""
    if len(expression) > 500:
        raise ValueError("expression too long (at most 500 characters)")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {e.msg}") from None
    value = _evaluate(tree.body)
    return str(int(value) if isinstance(value, float) and value.is_integer() else value)


def rag_tool(index, embedder=None, config=None) -> Tool:
    """A tool that searches a kiln.apps.rag.RagIndex and returns the passages with citations."""
    from kiln.apps.rag import RetrievalConfig, number_sources

    if config is None:
        config = RetrievalConfig(mode="hybrid" if embedder is not None else "bm25", top_k=3)

    def search_documents(query: str) -> str:
        """Search the document collection; returns numbered passages with their sources."""
        ids = index.search(query, config, embedder)
        return number_sources([index.chunks[i] for i in ids]) or "no passage matches"

    return tool_from_function(search_documents)
