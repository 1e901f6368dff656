"""Running the app: uvicorn with a bounded drain on SIGTERM and guarded connections."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from kiln.errors import InputError, KilnError
from kiln.serve.api import DEFAULT_MAX_QUEUE, create_app

log = logging.getLogger("kiln.serve")

HEADER_TIMEOUT_S = 10.0  # a request's headers must arrive within this
DEFAULT_MAX_CONNECTIONS = 4096
DEFAULT_BACKLOG = 4096  # connections the kernel holds for us before we accept them
SOMAXCONN = "/proc/sys/net/core/somaxconn"


def backlog_warning(backlog: int, somaxconn_path: str = SOMAXCONN) -> str | None:
    """Why a burst of new connections would stall, if it would: Linux caps the listen backlog
    at net.core.somaxconn, and a connection that finds the queue full is dropped and retried
    by the client's TCP a whole second later (seen here as a 1 s TTFT cliff when 1,000
    clients connect at once). None when the cap is at least `backlog` or unknown."""
    try:
        cap = int(open(somaxconn_path).read())
    except (OSError, ValueError):
        return None
    if cap >= backlog:
        return None
    return (
        f"the listen backlog ({backlog}) is capped at net.core.somaxconn={cap}: a burst of "
        f"more than {cap} new connections waits a TCP retry (1 s) each; raise it "
        f"(sysctl -w net.core.somaxconn={backlog}) or lower --backlog to silence this"
    )


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a bounded drain: the first SIGTERM/SIGINT turns new requests away
    with 503 (Retry-After) while the listener stays open, until what is in flight is done or
    `drain_timeout` s have passed; then uvicorn stops (cancelling what is left, which aborts
    it in the engine) and the process exits 0. A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout: float = 30.0):
        super().__init__(config)
        self.gate = app.state.ctx.gate
        self.drain_timeout = drain_timeout
        self.drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.drain_deadline is None:
            log.info("draining: up to %.0f s for %d sequences", self.drain_timeout,
                     self.gate.in_flight)  # fmt: skip
            self.gate.draining = True
            self.drain_deadline = time.monotonic() + self.drain_timeout
        else:
            self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None:
            left = self.drain_deadline - time.monotonic()
            if self.gate.in_flight == 0 or left <= 0:
                self.config.timeout_graceful_shutdown = max(1, int(left))
                return True
        return await super().on_tick(counter)


class HeaderDeadline:
    """A deadline for a request's headers: a connection that does not complete them in
    `header_timeout` s is closed (slowloris). uvicorn itself times out only idle keep-alive
    connections. Mixed into uvicorn's protocols below, which call _arm/_disarm."""

    header_timeout = HEADER_TIMEOUT_S
    _header_timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _too_slow(self) -> None:
        if self.cycle is None or self.cycle.response_complete:  # still no whole request
            self.timeout_keep_alive_handler()


class GuardedH11Protocol(HeaderDeadline, H11Protocol):
    """uvicorn's pure-Python h11 protocol with the header deadline."""

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()  # the next request's headers get the same deadline
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def _httptools_protocol():
    """uvicorn's httptools protocol (the C parser: a burst of requests is admitted several
    times faster than through h11) with the header deadline; None without httptools."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class GuardedHttpToolsProtocol(HeaderDeadline, HttpToolsProtocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            self._disarm()

        def on_response_complete(self) -> None:
            self._arm()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedHttpToolsProtocol


GuardedHttpToolsProtocol = _httptools_protocol()


def http_protocol(name: str):
    """uvicorn's HTTP protocol by name ("auto": httptools when installed, else h11), with
    the header deadline."""
    if name == "httptools" and GuardedHttpToolsProtocol is None:
        raise InputError("--http httptools needs the httptools package (pip install httptools)")
    if name == "h11" or GuardedHttpToolsProtocol is None:
        return GuardedH11Protocol
    return GuardedHttpToolsProtocol


def build_engine(model: str | os.PathLike, **engine_args: Any):
    """An AsyncLLM over a model directory (not started: the app starts it)."""
    from kiln.engine.async_engine import AsyncLLM

    return AsyncLLM(str(model), **engine_args)


def serve(
    model: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    log_level: str = "info",
    drain_timeout: float = 30.0,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    backlog: int = DEFAULT_BACKLOG,
    http: str = "auto",
    loop: str = "auto",
    public_metrics: bool = False,
    stream_send_timeout: float = 60.0,
    api_server_count: int = 1,
    tool_call_parser: str | None = None,
    lora_modules: dict[str, str] | None = None,
    lora_root: str | None = None,
    rollout_config: str | None = None,
    guardrails: str | None = None,
    **engine_args: Any,
) -> None:
    """Load `model`, serve it over HTTP until SIGTERM/SIGINT, then drain and return;
    EngineDeadError (the CLI exits non-zero) if the engine core process dies. With
    `api_server_count` > 1, that many API processes share the listener in front of one
    engine core (kiln.serve.api_servers)."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    opts = dict(
        api_key=api_key, served_model_name=served_model_name or str(model), max_queue=max_queue,
        log_level=log_level, drain_timeout=drain_timeout, max_connections=max_connections,
        http=http, loop=loop, public_metrics=public_metrics,
        stream_send_timeout=stream_send_timeout, tool_call_parser=tool_call_parser,
        lora_modules=lora_modules, lora_root=lora_root, rollout_config=rollout_config,
        guardrails=guardrails,
    )  # fmt: skip
    warning = backlog_warning(backlog)
    if warning:
        log.warning(warning)
    if api_server_count > 1:
        from kiln.serve.api_servers import serve_api_servers

        sock = bind_socket(host, port, backlog)
        serve_api_servers(str(model), api_server_count, sock, opts, engine_args, run_api_worker)
        return
    engine = build_engine(model, **engine_args)
    run_server(engine, host=host, port=port, backlog=backlog, **opts)


def bind_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket on (host, port) that child processes can inherit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def run_server(
    engine: Any,
    served_model_name: str,
    api_key: str | None,
    max_queue: int,
    log_level: str,
    drain_timeout: float,
    max_connections: int,
    http: str,
    loop: str,
    public_metrics: bool,
    stream_send_timeout: float,
    sockets: list[socket.socket] | None = None,
    request_id_tag: str = "",
    tool_call_parser: str | None = None,
    lora_modules: dict[str, str] | None = None,
    lora_root: str | None = None,
    rollout_config: str | None = None,
    guardrails: str | None = None,
    **listen: Any,
) -> None:
    """Serve `engine` with uvicorn (on `sockets`, else on listen's host, port and backlog)
    until SIGTERM/SIGINT and a drain; EngineDeadError if the engine core process dies."""
    from kiln.engine.async_engine import EngineDeadError

    app = create_app(engine, served_model_name, api_key=api_key, max_queue=max_queue,
                     public_metrics=public_metrics, stream_send_timeout=stream_send_timeout,
                     request_id_tag=request_id_tag,
                     tool_call_parser=tool_call_parser, lora_modules=lora_modules,
                     lora_root=lora_root, rollout_config=rollout_config,
                     guardrails=guardrails)  # fmt: skip
    config = uvicorn.Config(
        app, log_level=log_level, access_log=False, http=http_protocol(http), loop=loop,
        limit_concurrency=max_connections, **listen,
    )  # fmt: skip
    server = DrainingServer(config, app, drain_timeout)
    dead: list[int | None] = []

    def engine_died(exitcode: int | None) -> None:  # fail fast: a supervisor restarts us
        dead.append(exitcode)
        server.should_exit = True

    engine.on_dead.append(engine_died)
    server.run(sockets=sockets)
    if dead:
        raise EngineDeadError(f"the engine core process died (exit code {dead[0]}); stopped")


def run_api_worker(
    index: int, sock: socket.socket, model: str, addrs: list[str], core_pid: int,
    opts: dict[str, Any], engine_args: dict,
) -> None:  # fmt: skip
    """One API process: an AsyncLLM attached to the core, the app served on `sock`."""
    from kiln.engine.async_engine import AsyncLLM

    os.setpgrp()  # a terminal's Ctrl-C reaches the parent only, which forwards it once
    level = opts["log_level"].upper()
    logging.basicConfig(level=level, format=f"%(levelname)s %(name)s[w{index}]: %(message)s")
    attach = dict(addrs=addrs, index=index, core_pid=core_pid)
    try:
        engine = AsyncLLM(model, attach=attach, **engine_args)
        run_server(engine, sockets=[sock], request_id_tag=f"w{index}-", **opts)
    except KilnError as e:  # EngineDeadError among them
        log.error("API process %d: %s", index, e)
        raise SystemExit(1) from None
