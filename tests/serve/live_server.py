"""A real kiln server on loopback in a thread, and /metrics readers."""

from __future__ import annotations

import socket
import threading
import time

import httpx


class ServerThread:
    """uvicorn serving `app` on a free loopback port, in a daemon thread."""

    def __init__(self, app, **config):
        import uvicorn

        self.engine = app.state.ctx.engine
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10, **config)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive(), "server thread died while starting"
            assert time.monotonic() < deadline, "server did not start in 60 s"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "server did not stop in 30 s"


def start_server(
    model_dir, api_key=None, max_queue=256, public_metrics=False, stream_send_timeout=60.0,
    tool_call_parser=None, **engine_args,
) -> ServerThread:  # fmt: skip
    from kiln.engine.async_engine import AsyncLLM
    from kiln.serve.api import create_app

    engine = AsyncLLM(str(model_dir), **engine_args)
    app = create_app(
        engine, "tiny", api_key=api_key, max_queue=max_queue, public_metrics=public_metrics,
        stream_send_timeout=stream_send_timeout, tool_call_parser=tool_call_parser,
    )  # fmt: skip
    return ServerThread(app)


def read_metrics(url: str) -> dict[str, float]:
    """/metrics as {name{labels}: value} (comment lines dropped)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_all_blocks_free(url: str, timeout: float = 20.0) -> dict[str, float]:
    """Poll /metrics until nothing runs or waits and every KV block is free; return them."""
    deadline = time.monotonic() + timeout
    while True:
        m = read_metrics(url)
        idle = m["kiln:num_requests_running"] == 0 and m["kiln:num_requests_waiting"] == 0
        if idle and m["kiln:kv_cache_free_blocks"] == m["kiln:kv_cache_total_blocks"]:
            return m
        assert time.monotonic() < deadline, f"KV blocks still held after {timeout} s: {m}"
        time.sleep(0.05)
