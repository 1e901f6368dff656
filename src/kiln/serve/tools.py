"""Tool calling on /v1/chat/completions: the grammars that force a call, and the parsers that
find calls in what a model wrote (`--tool-call-parser`), whole or as a stream.

tool_choice "required" constrains the output to a JSON array of {"name", "parameters"}
objects (vLLM's schema), a named function to that function's parameters, so their arguments
always parse; "auto" lets the model write text, and the server's parser pulls the calls out:
- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Qwen, Hermes),
- llama3_json: the whole answer one JSON object `{"name": ..., "parameters": {...}}` (or
  several joined by ";"), optionally after `<|python_tag|>` (Llama 3.1+).

Streams report each call as `delta.tool_calls` fragments with the call's `index`: the first
fragment carries id, type and name, the next ones pieces of the arguments string, so that
concatenating a call's `arguments` fragments gives its arguments (never a repeat).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"chatcmpl-tool-{uuid.uuid4().hex}")

    def message(self) -> dict[str, Any]:
        """OpenAI's message.tool_calls entry."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}  # fmt: skip


def fragment(index: int, call: ToolCall | None = None, arguments: str = "") -> dict[str, Any]:
    """One delta.tool_calls entry: the call's head (id, type, name) or a piece of its
    arguments."""
    if call is not None:
        return {"index": index, "id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": arguments}}  # fmt: skip
    return {"index": index, "function": {"arguments": arguments}}


def merge_fragments(frags: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Streamed delta.tool_calls fragments joined into message.tool_calls entries."""
    calls: dict[int, dict[str, Any]] = {}
    for f in frags:
        call = calls.get(f["index"])
        if call is None:
            calls[f["index"]] = {"id": f["id"], "type": "function",
                                 "function": dict(f["function"])}  # fmt: skip
        else:
            call["function"]["arguments"] += f["function"]["arguments"]
    return [calls[i] for i in sorted(calls)]


# ---- grammars for tool_choice "required" and a named function ---------------------------


def required_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """JSON schema of an array of calls to any of `tools` (at most one unless `parallel`)."""
    items = [
        {"type": "object",
         "properties": {"name": {"type": "string", "enum": [t["name"]]},
                        "parameters": t.get("parameters") or {"type": "object"}},
         "required": ["name", "parameters"], "additionalProperties": False}
        for t in tools
    ]  # fmt: skip
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def parse_required(text: str) -> list[ToolCall]:
    """The calls of a grammar-forced "required" answer."""
    return [ToolCall(c["name"], json.dumps(c["parameters"], ensure_ascii=False))
            for c in json.loads(text)]  # fmt: skip


# ---- streams of forced calls -------------------------------------------------------------


class NamedStream:
    """The output is the named function's arguments: each delta is a piece of them."""

    def __init__(self, name: str):
        self.call = ToolCall(name, "")
        self.started = False

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        if not delta and (self.started or not final):
            return "", []
        head, self.started = not self.started, True
        return "", [fragment(0, self.call if head else None, delta)]


class RequiredStream:
    """The output is a JSON array of {"name", "parameters"}: each element is reported once
    it is complete (the grammar guarantees it parses)."""

    def __init__(self):
        self.buf = ""
        self.scan = 0  # how far the scanner has read buf
        self.depth = 0
        self.in_string = self.escaped = False
        self.start = -1  # where the element being read began
        self.index = 0

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        self.buf += delta
        found = []
        for i in range(self.scan, len(self.buf)):
            ch = self.buf[i]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "[{":
                self.depth += 1
                if self.depth == 2:
                    self.start = i
            elif ch in "]}":
                if self.depth == 2:
                    c = json.loads(self.buf[self.start : i + 1])
                    call = ToolCall(c["name"], json.dumps(c["parameters"], ensure_ascii=False))
                    found.append(fragment(self.index, call, call.arguments))
                    self.index += 1
                self.depth -= 1
        self.scan = len(self.buf)
        return "", found


# ---- parsers of free text ("auto") --------------------------------------------------------


class ToolParser:
    """Finds tool calls in a model's answer: `parse` for a whole one, `stream` for deltas."""

    name = ""

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(the text that is not a call, or None; the calls)."""
        content, calls = "", []
        stream = self.stream()
        for part in (text, ""):
            c, frags = stream.feed(part, final=not part)
            content += c
            calls += frags
        return content or None, [ToolCall(f["function"]["name"], f["function"]["arguments"],
                                          f["id"]) for f in calls]  # fmt: skip

    def stream(self):
        raise NotImplementedError


def _call_from_json(body: str, args_key: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _held_back(text: str, marker: str) -> int:
    """How many trailing characters of `text` could be the start of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class HermesStream:
    START, END = "<tool_call>", "</tool_call>"

    def __init__(self):
        self.buf = ""
        self.in_call = False
        self.index = 0

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        self.buf += delta
        content, found = "", []
        while True:
            if not self.in_call:
                i = self.buf.find(self.START)
                if i >= 0:
                    content += self.buf[:i]
                    self.buf, self.in_call = self.buf[i + len(self.START) :], True
                    continue
                keep = 0 if final else _held_back(self.buf, self.START)
                content += self.buf[: len(self.buf) - keep]
                self.buf = self.buf[len(self.buf) - keep :]
                return content, found
            j = self.buf.find(self.END)
            if j < 0 and not final:
                return content, found
            body = self.buf if j < 0 else self.buf[:j]
            self.buf = "" if j < 0 else self.buf[j + len(self.END) :]
            self.in_call = False
            call = _call_from_json(body.strip(), "arguments")
            if call is None:  # not a call after all: it stays text
                content += self.START + body + ("" if j < 0 else self.END)
            else:
                found.append(fragment(self.index, call, call.arguments))
                self.index += 1
            if j < 0:
                return content, found


class HermesParser(ToolParser):
    name = "hermes"

    def stream(self) -> HermesStream:
        return HermesStream()


class Llama3JsonStream:
    """Tool-call mode when the answer starts (after whitespace) with `{` or the python tag:
    then it is read whole at the end; any other answer streams as text."""

    TAG = "<|python_tag|>"

    def __init__(self):
        self.buf = ""
        self.mode: str | None = None  # "text" | "call", once known

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        self.buf += delta
        if self.mode is None:
            head = self.buf.lstrip()
            if head.startswith(("{", self.TAG)):
                self.mode = "call"
            elif head and not self.TAG.startswith(head):
                self.mode = "text"
            elif not final:
                return "", []
            else:
                self.mode = "text"
        if self.mode == "text":
            text, self.buf = self.buf, ""
            return text, []
        if not final:
            return "", []
        calls = _json_calls(self.buf.lstrip().removeprefix(self.TAG))
        if not calls:
            return self.buf, []  # not calls after all
        return "", [fragment(i, c, c.arguments) for i, c in enumerate(calls)]


def _json_calls(body: str) -> list[ToolCall] | None:
    """Calls written as JSON objects one after another, separated by ";" (None: not that)."""
    decoder = json.JSONDecoder()
    calls, at = [], 0
    while True:
        while at < len(body) and body[at] in " \t\r\n;":
            at += 1
        if at == len(body):
            return calls or None
        try:
            obj, at = decoder.raw_decode(body, at)
        except ValueError:
            return None
        call = _call_from_json(json.dumps(obj), "parameters")
        if call is None:
            return None
        calls.append(call)


class Llama3JsonParser(ToolParser):
    name = "llama3_json"

    def stream(self) -> Llama3JsonStream:
        return Llama3JsonStream()


TOOL_PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser)}
