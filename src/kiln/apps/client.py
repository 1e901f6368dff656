"""A small OpenAI-compatible HTTP client (httpx): chat completions, with tools, and embeddings."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np

from kiln.errors import InputError


class ServerError(InputError):
    """The server answered with an error, or could not be reached."""


class OpenAIClient:
    """`base_url` is the server's root or its /v1 (http://127.0.0.1:8000 or .../v1)."""

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
    ):
        root = base_url.rstrip("/")
        self.base_url = root if root.endswith("/v1") else root + "/v1"
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a JSON body; the JSON answer, or ServerError with the server's own message."""
        if self.model is not None:
            body = {"model": self.model, **body}
        try:
            r = self.http.post(path, json=body)
        except httpx.HTTPError as e:
            raise ServerError(f"cannot reach {self.base_url}{path}: {e}") from None
        if r.status_code != 200:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:200]
            raise ServerError(f"{path}: HTTP {r.status_code}: {message}")
        return r.json()

    def chat(self, messages: list[dict[str, Any]], **params: Any) -> dict[str, Any]:
        """The assistant's message (a dict with content and maybe tool_calls) for `messages`;
        `params` go into the request as they are (tools, tool_choice, max_tokens, ...)."""
        out = self.post("/chat/completions", {"messages": messages, **params})
        return out["choices"][0]["message"]

    def complete_text(self, prompt: str, **params: Any) -> str:
        """The assistant's text for one user message."""
        return self.chat([{"role": "user", "content": prompt}], **params).get("content") or ""

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """[len(texts), dim] float32 embeddings from /v1/embeddings, in batches."""
        vecs: list[list[float]] = []
        for i in range(0, len(texts), batch_size):
            out = self.post("/embeddings", {"input": texts[i : i + batch_size]})
            vecs += [d["embedding"] for d in sorted(out["data"], key=lambda d: d["index"])]
        return np.asarray(vecs, dtype=np.float32).reshape(len(texts), -1)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> OpenAIClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
