"""`kiln serve --api-server-count N`: N API processes in front of one engine core.

One API process admits a burst of requests at the speed of its one CPU (parse, tokenize,
detokenize, stream) while the engine waits for them; several share that work. The parent binds
the listening socket, starts the engine-core process for N clients, then N API processes
(multiprocessing spawn), each an AsyncLLM attached to the core (its own tokenizer) serving the
app with uvicorn on the inherited socket (the kernel hands each connection to one of them).
Request ids carry the worker ("cmpl-w1-...") so they are unique across workers.

The parent supervises: if the core or a worker dies it stops the rest and raises (the CLI
exits non-zero, a supervisor restarts it); the surviving workers' in-flight requests get the
engine's 500 error. SIGTERM/SIGINT on the parent is forwarded to the workers, which drain as
one server does (503 to new requests, in-flight ones finish within --drain-timeout); then the
core is stopped and serve returns.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kiln.errors import KilnError

log = logging.getLogger("kiln.serve")

TICK_S = 0.1  # how often the parent looks at its children
STOP_GRACE_S = 10.0  # beyond the drain timeout, before a worker or the core is killed


def serve_api_servers(
    model: str, count: int, sock: socket.socket, opts: dict[str, Any], engine_args: dict,
    worker: Callable,
) -> None:  # fmt: skip
    """Serve `model` with `count` API processes on `sock` until a signal; KilnError when the
    engine core or a worker died. `worker(index, sock, model, addrs, core_pid, opts,
    engine_args)` runs in each (kiln.serve.server.run_api_worker)."""
    from kiln.config import ModelConfig
    from kiln.engine.async_engine import eos_token_ids
    from kiln.engine.config import EngineConfig
    from kiln.engine.core_client import core_addresses, start_core
    from kiln.engine.llm_engine import load_engine_tokenizer

    EngineConfig.from_kwargs(dict(engine_args))  # bad arguments fail here, before any process
    path = Path(model)
    eos = eos_token_ids(path, load_engine_tokenizer(path), ModelConfig.from_dir(path))
    addrs = core_addresses(count)
    core = start_core(model, dict(engine_args, eos_token_ids=sorted(eos)), addrs)
    worker_opts = dict(opts, max_queue=math.ceil(opts["max_queue"] / count))
    spawn = multiprocessing.get_context("spawn")
    workers = [
        spawn.Process(
            target=worker,
            name=f"kiln-api-{i}",
            args=(i, sock, model, addrs[i], core.pid, worker_opts, engine_args),
        )  # fmt: skip
        for i in range(count)
    ]
    for w in workers:
        w.start()
    sock.close()  # the workers hold it now
    log.info("%d API processes (pids %s) in front of the engine core (pid %d)", count,
             [w.pid for w in workers], core.pid)  # fmt: skip
    signals: list[int] = []

    def forward(sig: int, frame: Any) -> None:
        signals.append(sig)
        for w in workers:
            if w.exitcode is None:
                os.kill(w.pid, signal.SIGTERM if len(signals) == 1 else signal.SIGKILL)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        failure = supervise(core, workers, signals)
        if failure is not None:
            log.error("%s: stopping the other processes", failure)
            for w in workers:
                if w.exitcode is None:
                    os.kill(w.pid, signal.SIGTERM)
        stop_workers(workers, opts["drain_timeout"] + STOP_GRACE_S)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        stop_core(core)
    if failure is not None:
        raise KilnError(f"{failure}; stopped")


def supervise(core: subprocess.Popen, workers: list, signals: list[int]) -> str | None:
    """Wait until every worker has exited after a signal (None), or a process died (why)."""
    while True:
        if core.poll() is not None:  # reaped at once: the workers watch its pid
            return f"the engine core process died (exit code {core.returncode})"
        for i, w in enumerate(workers):
            if w.exitcode is not None and not signals:
                return f"API process {i} died (exit code {w.exitcode})"
        if signals and all(w.exitcode is not None for w in workers):
            return None
        time.sleep(TICK_S)


def stop_workers(workers: list, timeout: float) -> None:
    """Wait up to `timeout` s for the workers to exit, then kill those left."""
    deadline = time.monotonic() + timeout
    for w in workers:
        w.join(max(0.0, deadline - time.monotonic()))
        if w.exitcode is None:
            w.kill()
            w.join(5)


def stop_core(core: subprocess.Popen) -> None:
    """Stop the engine core (no client is left to ask it): SIGTERM, then SIGKILL."""
    if core.poll() is None:
        core.terminate()
        try:
            core.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            core.kill()
            core.wait(5)
