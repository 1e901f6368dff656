"""A stub OpenAI-compatible server in a thread (http.server, loopback): /v1/models, a chat
endpoint whose reply is `chat(prompt text)`, and /v1/completions that returns text without any
logprobs (a server lacking the log-likelihood API)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StubServer:
    def __init__(self, chat=lambda content: "1", completion="stub"):
        self.chat, self.completion, self.requests = chat, completion, []
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

            def do_GET(self):
                if self.path == "/v1/models":
                    return self._send({"object": "list", "data": [{"id": "stub"}]})
                self._send({"error": {"message": "not found"}}, 404)

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, req))
                if self.path == "/v1/chat/completions":
                    text = outer.chat(req["messages"][-1]["content"])
                    message = {"role": "assistant", "content": text}
                    choice = {"index": 0, "message": message, "finish_reason": "stop"}
                    return self._send({"choices": [choice]})
                if self.path == "/v1/completions":
                    return self._send({"choices": [{"index": 0, "text": outer.completion,
                                                    "finish_reason": "length"}]})  # fmt: skip
                self._send({"error": {"message": "not found"}}, 404)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> StubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
