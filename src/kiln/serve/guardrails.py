"""`kiln serve --guardrails CONFIG`: kiln.apps.guardrails as ASGI middleware around the
completion routes. A request's user and tool texts are checked (blocked with an OpenAI-shaped
400, or rewritten with PII redacted) before the app sees them; an answer is checked before the
client does: whole, or as its stream goes by (StreamFilter), a blocked answer ending with
finish_reason "content_filter". Each decision is logged and counted in /metrics as
kiln:guardrail_decisions_total{stage, check, action}."""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from kiln.apps.guardrails import Blocked, Guardrails, GuardrailsConfig, StreamFilter
from kiln.serve.protocol import error_body

ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
CHECKED_ROLES = ("user", "tool")  # what a user or a tool wrote; the system prompt is the operator's
MAX_BODY_BYTES = 4 * 2**20


def install(app, path: str, registry: CollectorRegistry, api_key: str | None = None) -> None:
    """Load the guardrails config at `path` and wrap `app`'s completion routes with it."""
    decisions = Counter("kiln:guardrail_decisions", "Guardrail decisions by stage, check and "
                        "action.", ["stage", "check", "action"], registry=registry)  # fmt: skip
    guard = Guardrails(GuardrailsConfig.from_file(path),
                       lambda d: decisions.labels(d.stage, d.check, d.action).inc())  # fmt: skip
    app.add_middleware(GuardrailsMiddleware, guard=guard, api_key=api_key)


def _texts(kind: str, req: dict[str, Any]):
    """(container, key) of each text of a request the input checks read."""
    if kind == "chat":
        for m in req.get("messages") or []:
            if not isinstance(m, dict) or m.get("role") not in CHECKED_ROLES:
                continue
            if isinstance(m.get("content"), str):
                yield m, "content"
            elif isinstance(m.get("content"), list):
                yield from ((p, "text") for p in m["content"]
                            if isinstance(p, dict) and isinstance(p.get("text"), str))  # fmt: skip
    else:
        prompt = req.get("prompt")
        if isinstance(prompt, str):
            yield req, "prompt"
        elif isinstance(prompt, list):
            yield from ((prompt, i) for i, p in enumerate(prompt) if isinstance(p, str))


class GuardrailsMiddleware:
    def __init__(self, app, guard: Guardrails, api_key: str | None = None):
        self.app, self.guard = app, guard
        self.api_key = api_key.encode() if api_key else None

    def _authorized(self, scope) -> bool:
        """Unauthenticated requests go straight on to the app's 401."""
        if self.api_key is None:
            return True
        value = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = value.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    async def __call__(self, scope, receive, send) -> None:
        kind = ROUTES.get(scope.get("path", "")) if scope["type"] == "http" else None
        if kind is None or scope["method"] != "POST" or not self._authorized(scope):
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY_BYTES:  # the app refuses it (413) on its own
                return await self.app(scope, _replay(body, more, receive), send)
        try:
            req = json.loads(body)
        except ValueError:
            req = None  # the app answers a malformed body with its own 400
        if isinstance(req, dict):
            try:
                if await asyncio.to_thread(self._check_request, kind, req):
                    body = json.dumps(req).encode()
                    scope = _with_length(scope, len(body))
            except Blocked as e:
                param = "messages" if kind == "chat" else "prompt"
                return await _send_json(send, 400, error_body(
                    f"blocked by guardrails: {e}", "invalid_request_error", param=param,
                    code="guardrails_blocked"))  # fmt: skip
        await self.app(scope, _replay(body, False, receive), OutputChecker(self.guard, kind, send))

    def _check_request(self, kind: str, req: dict[str, Any]) -> bool:
        """Check (and redact in place) each text; whether any changed."""
        changed = False
        for holder, key in list(_texts(kind, req)):
            text = self.guard.check_input(holder[key])
            changed |= text != holder[key]
            holder[key] = text
        return changed


class OutputChecker:
    """The app's `send`, rewriting a 200 answer: a JSON body once whole, an event stream event
    by event."""

    def __init__(self, guard: Guardrails, kind: str, send):
        self.guard, self.kind, self.send = guard, kind, send
        self.start: dict[str, Any] | None = None
        self.stream = False
        self.body = b""
        self.filters: dict[int, StreamFilter | None] = {}  # by choice index; None: blocked

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers", []))
            if message["status"] != 200:
                self.start = None
                return await self.send(message)
            self.stream = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            self.start = message
            if self.stream:
                await self.send(message)
            return
        if message["type"] != "http.response.body" or self.start is None:
            return await self.send(message)
        self.body += message.get("body", b"")
        more = message.get("more_body", False)
        if self.stream:
            events, _, self.body = self.body.rpartition(b"\n\n")
            out = await asyncio.to_thread(self._events, events) if events else b""
            if not more:  # a last piece without its blank line: passed on as it is
                out, self.body = out + self.body, b""
            return await self.send({"type": "http.response.body", "body": out, "more_body": more})
        if more:
            return
        body = await asyncio.to_thread(self._whole, self.body)
        start = {**self.start, "headers": [(k, v) for k, v in self.start["headers"]
                                           if k != b"content-length"]
                 + [(b"content-length", str(len(body)).encode())]}  # fmt: skip
        await self.send(start)
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    def _whole(self, body: bytes) -> bytes:
        try:
            resp = json.loads(body)
        except ValueError:
            return body
        for choice in resp.get("choices") or []:
            holder, key = (
                (choice["message"], "content") if self.kind == "chat" else (choice, "text")
            )
            if isinstance(holder.get(key), str):
                try:
                    holder[key] = self.guard.check_output(holder[key])
                except Blocked:
                    holder[key], choice["finish_reason"] = "", "content_filter"
        return json.dumps(resp).encode()

    def _events(self, events: bytes) -> bytes:
        out = []
        for event in events.split(b"\n\n"):
            data = event.removeprefix(b"data: ")
            try:
                chunk = json.loads(data)
            except ValueError:  # [DONE], or not ours to read
                out.append(event)
                continue
            if not isinstance(chunk, dict) or not chunk.get("choices"):
                out.append(event)
                continue
            chunk["choices"] = [c for c in chunk["choices"] if self._choice(c)]
            if chunk["choices"]:
                out.append(b"data: " + json.dumps(chunk).encode())
        return b"".join(e + b"\n\n" for e in out)

    def _choice(self, choice: dict[str, Any]) -> bool:
        """Filter one streamed choice in place; False drops it (its answer was blocked)."""
        index = choice.get("index", 0)
        if index not in self.filters:
            self.filters[index] = self.guard.stream_filter()
        f = self.filters[index]
        if f is None:
            return False
        holder, key = (choice.get("delta") or {}, "content") if self.kind == "chat" \
            else (choice, "text")  # fmt: skip
        text = holder.get(key) or ""
        try:
            text = f.feed(text)
            if choice.get("finish_reason") is not None:
                text += f.finish()
        except Blocked:
            self.filters[index] = None
            text, choice["finish_reason"] = "", "content_filter"
        if key in holder or text:
            holder[key] = text
            if self.kind == "chat":
                choice["delta"] = holder
        return True


def _replay(body: bytes, more: bool, receive):
    """A `receive` that gives `body` first (and then, when `more`, the rest) and after it
    whatever the client sends (a disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": more}
        return await receive()

    return replay


def _with_length(scope, length: int):
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
    return {**scope, "headers": headers + [(b"content-length", str(length).encode())]}


async def _send_json(send, status: int, obj: Any) -> None:
    body = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})
