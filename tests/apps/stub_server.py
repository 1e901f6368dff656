"""A stub OpenAI-compatible server in a thread for the applications' tests: /v1/chat/completions
answers with `chat(request body) -> assistant message`, /v1/embeddings with `embed(texts)`.
A capable model's behaviour is scripted here; the applications' logic is what is tested."""

from __future__ import annotations

import json
import re
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np


def _ngram_counts(texts: list[str], dim: int, n: int = 4) -> np.ndarray:
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in re.findall(r"\w+", text.lower()):
            w = f" {word} "
            for i in range(max(1, len(w) - n + 1)):
                out[row, zlib.crc32(w[i : i + n].encode()) % dim] += 1.0
    return out


class NgramEmbedder:
    """A deterministic embedding standing in for a trained embedding model (the tiny test
    model's are noise): TF-IDF of hashed character 4-grams of the words, L2-normalized, its
    IDF fitted on a corpus. Unlike BM25's whole words it matches word parts ("cowardly" ~
    "cowards"), the kind of match a dense retriever adds to a sparse one."""

    def __init__(self, corpus: list[str], dim: int = 4096):
        self.dim = dim
        df = (_ngram_counts(corpus, dim) > 0).sum(0)
        self.idf = np.log((1 + len(corpus)) / (1 + df)) + 1.0

    def __call__(self, texts: list[str]) -> np.ndarray:
        v = np.log1p(_ngram_counts(texts, self.dim)) * self.idf
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


class StubServer:
    def __init__(self, chat=None, embed=None):
        self.chat, self.embed, self.requests = chat, embed, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, obj, code=200):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, req))
                if self.path == "/v1/chat/completions" and outer.chat is not None:
                    message = {"role": "assistant", "content": None, **outer.chat(req)}
                    choice = {"index": 0, "message": message, "finish_reason": "stop"}
                    return self._send({"choices": [choice]})
                if self.path == "/v1/embeddings" and outer.embed is not None:
                    inputs = req["input"] if isinstance(req["input"], list) else [req["input"]]
                    vecs = outer.embed(inputs)
                    data = [{"object": "embedding", "index": i, "embedding": v.tolist()}
                            for i, v in enumerate(vecs)]  # fmt: skip
                    return self._send({"object": "list", "data": data})
                self._send({"error": {"message": f"no route {self.path}"}}, 404)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> StubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
