"""The engine core in its own process, and the client the API process talks to it through.

Two ZeroMQ PUSH/PULL sockets over IPC carry msgpack (msgspec) messages: requests, aborts and
stops go in; one `CoreOutputs` per engine step comes out with every sequence's new tokens and
the engine's stats. The core never waits on the API side (its send queue is unbounded); the
API side reads on its asyncio loop's thread (the socket's descriptor in the loop's selector).

The core may serve several API processes (`kiln serve --api-server-count N`): its one inbox
is connected to every client's endpoint (ZeroMQ fair-queues them), it has one outbox per
client, each `AddRequest` names its client, and each step's deltas and errors go to the client
that sent the request; stats go to all of them. Request ids must be unique across clients.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from kiln import errors
from kiln.engine.lora import LoRARequest
from kiln.engine.outputs import SeqDelta
from kiln.engine.sampling_params import SamplingParams
from kiln.errors import KilnError, WorkerDiedError

log = logging.getLogger("kiln.engine")

POLL_MS = 200  # how often an idle side looks at the other one's health


class AddRequest(msgspec.Struct, tag="add", array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    client: int = 0  # which API process sent it (its outputs go back there)
    lora_request: LoRARequest | None = None


class Abort(msgspec.Struct, tag="abort", array_like=True):
    request_ids: list[str]


class FinishSeqs(msgspec.Struct, tag="stop", array_like=True):
    """Sequences the API side ended on a stop string: (request_id, index, stop)."""

    stops: list[tuple[str, int, str]]


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass


class Embed(msgspec.Struct, tag="embed", array_like=True):
    """Pool each prompt's hidden states (answered in CoreOutputs.embeddings)."""

    request_id: str
    prompts: list[list[int]]
    pooling: str | None = None
    client: int = 0


CoreInput = AddRequest | Abort | FinishSeqs | Shutdown | Embed


class CoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True):
    """One message from the core: a step's deltas, refused requests, stats, or its state."""

    deltas: list[SeqDelta] = []
    errors: list[tuple[str, str]] = []  # (request_id, why): the core failed these requests
    stats: dict[str, Any] | None = None  # numbers, and lists of them (per-position counts)
    embeddings: list[tuple[str, list[list[float]]]] = []  # (request_id, a vector per prompt)
    ready: dict[str, Any] | None = None  # first message after start-up: the engine's facts
    fatal: str | None = None  # the core could not start (the error's one line)


class EngineDeadError(KilnError):
    """The engine-core process is gone: nothing in flight can finish (the server answers 500
    and exits so that a supervisor restarts it)."""


class EngineStopped(KilnError):
    """A request arrived while the engine drains for shutdown (the server answers 503)."""


# ---------------------------------------------------------------------- the core process


def run_engine_core(
    model: str, kwargs: dict[str, Any], clients: list[list[str]], parent_pid: int
) -> None:
    """The engine-core process: build the engine, then step it while there is work.
    `clients`: each API process's [in_addr, out_addr], in client-index order."""
    from kiln.engine.core import EngineCore

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the API process's to handle
    # SIGTERM (a supervisor stopping it) exits through SystemExit: atexit handlers still run
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _set_host_threads(kwargs.get("device"))
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    outboxes = []
    for in_addr, out_addr in clients:
        inbox.connect(in_addr)
        outbox = ctx.socket(zmq.PUSH)
        outbox.setsockopt(zmq.SNDHWM, 0)  # never block the GPU loop on a slow reader
        outbox.connect(out_addr)
        outboxes.append(outbox)
    encode = msgspec.msgpack.Encoder().encode
    try:
        core = EngineCore(model, **kwargs)
    except KilnError as e:
        for outbox in outboxes:
            outbox.send(encode(CoreOutputs(fatal=f"{type(e).__name__}: {e}")))
        _close(ctx, inbox, outboxes)
        sys.exit(1)
    ready = dict(max_model_len=core.max_model_len, vocab_size=core.model_config.vocab_size)
    for outbox in outboxes:
        outbox.send(encode(CoreOutputs(ready=ready, stats=core.stats())))
    loop = EngineCoreLoop(core, inbox, outboxes, parent_pid)
    loop.run()
    _close(ctx, inbox, outboxes)
    if loop.failed:
        sys.exit(1)


def _close(ctx: zmq.Context, inbox: zmq.Socket, outboxes: list[zmq.Socket]) -> None:
    """Close the core's sockets; returns once what the outboxes hold is out (5 s at most)."""
    for outbox in outboxes:
        outbox.close(linger=5000)
    inbox.close(linger=0)
    ctx.term()


def core_threads(device: str | None) -> int:
    """torch's intra-op threads for an engine core on `device` (None: the default device).
    Those threads spin at their barriers between ops. On the CPU the model runs on them, so the
    core takes all cores but one: one thread per core plus a busy API process makes every op
    wait for a descheduled thread (10x slower steps on 2 cores). On a GPU the core's host work
    is Python and small tensors, which more threads do not speed up; spinning, they took 9-10
    of an H100 host's 16 cores in the serve sweeps, beside the API processes and xgrammar's
    mask-filling pool. There it takes one (as vLLM's GPU workers do)."""
    import torch

    from kiln.model.loader import default_device

    if torch.device(device or default_device()).type == "cuda":
        return 1
    return max(1, (os.cpu_count() or 2) - 1)


def _set_host_threads(device: str | None) -> None:
    """core_threads(device) intra-op threads, unless OMP_NUM_THREADS says otherwise."""
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(core_threads(device))
        log.info("engine core: %d torch intra-op thread(s)", torch.get_num_threads())


class EngineCoreLoop:
    """Inputs in, one step, outputs out; blocks on the inbox only while there is no work.
    With several clients, each request's outputs go to the outbox of the client that sent it."""

    def __init__(self, core, inbox: zmq.Socket, outboxes: list[zmq.Socket], parent_pid: int):
        self.core = core
        self.inbox = inbox
        self.outboxes = outboxes
        self.parent_pid = parent_pid
        self.decode = msgspec.msgpack.Decoder(CoreInput).decode
        self.encode = msgspec.msgpack.Encoder().encode
        self.errors: list[tuple[str, str]] = []
        self.embeddings: list[tuple[str, list[list[float]]]] = []
        self.running = True
        self.failed = False  # stopped because no step can run (a tensor-parallel worker died)
        self.last_stats: dict | None = None
        self.owner: dict[str, int] = {}  # request_id -> client (only with several clients)

    def run(self) -> None:
        core = self.core
        while self.running:
            if not core.has_work() and not self.inbox.poll(POLL_MS):
                if os.getppid() != self.parent_pid:  # the API process died: nobody to serve
                    return
                continue
            while self.inbox.poll(0):
                self.handle(self.decode(self.inbox.recv()))
            deltas = self.step() if core.has_work() else []
            stats = core.stats()
            if deltas or self.errors or self.embeddings or stats != self.last_stats:
                changed = stats if stats != self.last_stats else None
                self.send(deltas, self.errors, stats, changed)
                self.errors, self.embeddings, self.last_stats = [], [], stats

    def send(self, deltas: list[SeqDelta], errors: list, stats: dict, changed: dict | None):
        """One step's outputs: all to the one client, or each to its own (stats to all)."""
        if len(self.outboxes) == 1:
            msg = CoreOutputs(deltas=deltas, errors=errors, stats=stats, embeddings=self.embeddings)
            self.outboxes[0].send(self.encode(msg), copy=False)
            return
        n = len(self.outboxes)
        by_client: list[tuple[list, list, list]] = [([], [], []) for _ in range(n)]
        for rid, vecs in self.embeddings:
            by_client[self.owner.pop(rid, 0)][2].append((rid, vecs))
        for d in deltas:
            by_client[self.owner.get(d.request_id, 0)][0].append(d)
            if d.finish_reason is not None and d.request_id not in self.core.requests:
                self.owner.pop(d.request_id, None)  # its last sequence finished
        for rid, why in errors:
            by_client[self.owner.pop(rid, 0)][1].append((rid, why))
        for outbox, (ds, es, vs) in zip(self.outboxes, by_client, strict=True):
            if ds or es or vs or changed is not None:
                msg = CoreOutputs(deltas=ds, errors=es, stats=stats, embeddings=vs)
                outbox.send(self.encode(msg), copy=False)

    def step(self) -> list[SeqDelta]:
        try:
            deltas = self.core.step()
            self.errors += self.core.take_errors()
            return deltas
        except Exception as e:  # the model failed: fail every request, keep serving
            traceback.print_exc()
            why = f"the engine failed: {type(e).__name__}: {e}"
            self.errors += [(rid, why) for rid in self.core.abort_all()]
            if isinstance(e, WorkerDiedError):  # no step can run: exit, the server with us
                self.running, self.failed = False, True
            return []

    def handle(self, msg: CoreInput) -> None:
        core = self.core
        if isinstance(msg, AddRequest):
            if len(self.outboxes) > 1:
                self.owner[msg.request_id] = msg.client
            try:
                core.add_request(msg.request_id, msg.prompt_token_ids, msg.params, msg.lora_request)
            except KilnError as e:
                self.errors.append((msg.request_id, str(e)))
        elif isinstance(msg, Abort):
            for rid in msg.request_ids:
                core.abort(rid)
                self.owner.pop(rid, None)
        elif isinstance(msg, Embed):  # between steps: a prefill's worth of work
            if len(self.outboxes) > 1:
                self.owner[msg.request_id] = msg.client
            try:
                self.embeddings.append((msg.request_id, core.embed(msg.prompts, msg.pooling)))
            except KilnError as e:
                self.errors.append((msg.request_id, str(e)))
        elif isinstance(msg, FinishSeqs):
            for rid, index, stop in msg.stops:
                core.finish_seq(rid, index, "stop", stop)
                if rid not in core.requests:
                    self.owner.pop(rid, None)
        else:
            self.running = False


# ---------------------------------------------------------------------- the API side


def core_addresses(num_clients: int) -> list[list[str]]:
    """Fresh IPC endpoints, [in_addr, out_addr] for each client of one engine core."""
    base = os.path.join(tempfile.gettempdir(), f"kiln-{uuid.uuid4().hex[:12]}")
    return [[f"ipc://{base}-{i}-in", f"ipc://{base}-{i}-out"] for i in range(num_clients)]


def start_core(model: str, engine_kwargs: dict[str, Any], clients: list[list[str]]):
    """Start the engine-core process for `clients` (core_addresses); its Popen.
    A fresh interpreter (not multiprocessing): no re-import of the caller's __main__, no CUDA
    state inherited from a fork. The core exits when the calling process does."""
    spec = json.dumps(dict(model=model, kwargs=_plain(engine_kwargs), clients=clients,
                           parent_pid=os.getpid()))  # fmt: skip
    return subprocess.Popen([sys.executable, "-m", "kiln.engine.core_client", spec])


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return not os.path.isdir("/proc/self")  # gone since kill(0), or no procfs to ask


class EngineCoreClient:
    """Starts the engine-core process and talks to it; `read_on_loop` calls
    `on_message(CoreOutputs)` and `on_dead(exitcode)` on an asyncio loop. `attach` talks to a
    core another process started (one API process of several): it only watches that core's
    pid."""

    def __init__(self, model: str, startup_timeout: float = 1800.0, **engine_kwargs: Any):
        addrs = core_addresses(1)
        self._bind(addrs[0], 0)
        self.proc: subprocess.Popen | None = start_core(model, engine_kwargs, addrs)
        self.core_pid = self.proc.pid
        self._start(startup_timeout)

    @classmethod
    def attach(
        cls, addrs: list[str], index: int, core_pid: int, startup_timeout: float = 1800.0
    ) -> EngineCoreClient:
        """The client `index` of a running core (started with core_addresses' `addrs`)."""
        self = cls.__new__(cls)
        self._bind(addrs, index)
        self.proc = None
        self.core_pid = core_pid
        self._start(startup_timeout)
        return self

    def _bind(self, addrs: list[str], index: int) -> None:
        in_addr, out_addr = addrs
        self.index = index
        self.ctx = zmq.Context()
        self._paths = [a.removeprefix("ipc://") for a in addrs]
        self.inbox = self.ctx.socket(zmq.PUSH)  # our sends: the core's inbox
        self.inbox.setsockopt(zmq.SNDHWM, 0)
        self.inbox.bind(in_addr)
        self.outbox = self.ctx.socket(zmq.PULL)  # the core's outputs
        self.outbox.setsockopt(zmq.RCVHWM, 0)
        self.outbox.bind(out_addr)
        self.encode = msgspec.msgpack.Encoder().encode
        self.decode = msgspec.msgpack.Decoder(CoreOutputs).decode

    def _start(self, startup_timeout: float) -> None:
        self.dead = False
        self._closing = False
        self._loop_reader: tuple[Any, int] | None = None  # (loop, fd) while read_on_loop reads
        self._watch: Any = None  # its health-check timer
        first = self._wait_ready(startup_timeout)
        self.info: dict[str, Any] = first.ready
        self.stats: dict[str, float] = first.stats or {}

    def core_alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return pid_alive(self.core_pid)

    def exitcode(self) -> int | None:
        """The core's exit code once it is gone (None when another process started it)."""
        return None if self.proc is None else self.proc.returncode

    def _wait_ready(self, timeout: float) -> CoreOutputs:
        deadline = time.monotonic() + timeout
        while not self.outbox.poll(POLL_MS):
            if not self.core_alive() and not self.outbox.poll(POLL_MS):
                self.close()
                raise KilnError(f"the engine core exited while starting (code {self.exitcode()})")
            if time.monotonic() > deadline:
                self.close()
                raise KilnError(f"the engine core did not start in {timeout:.0f} s")
        msg = self.decode(self.outbox.recv())
        if msg.fatal is not None:
            if self.proc is not None:
                self.proc.wait(timeout=10)
            self.close()
            name, _, text = msg.fatal.partition(": ")
            raise getattr(errors, name, KilnError)(text)  # the core's error type, by name
        return msg

    def read_on_loop(self, loop, on_message: Callable, on_dead: Callable) -> None:
        """Read the core's outputs on `loop`'s thread (call it there), not on a thread of
        their own: the socket's descriptor in the loop's selector, each message handled as
        soon as it is read (no GIL hand-off to the loop and no wake-up of it per message);
        every POLL_MS a timer looks at the core's health. `stop_reading` ends it."""
        fd = self.outbox.getsockopt(zmq.FD)

        def drain() -> None:
            # ZeroMQ's descriptor is edge-triggered: read until nothing is left
            while not self._closing:
                try:
                    frame = self.outbox.recv(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    return
                msg = self.decode(frame.buffer)
                if msg.stats is not None:
                    self.stats = msg.stats
                try:
                    on_message(msg)
                except Exception:  # logged; the messages behind it are still read
                    log.exception("handling the engine core's outputs failed")

        def watch() -> None:
            if self._closing:
                return
            drain()  # (a missed edge waits here at most POLL_MS)
            if self.core_alive():
                self._watch = loop.call_later(POLL_MS / 1000, watch)
                return
            drain()  # what it said before it died still counts
            self.stop_reading()
            self.dead = True
            on_dead(self.exitcode())

        self._loop_reader = (loop, fd)
        loop.add_reader(fd, drain)
        self._watch = loop.call_later(POLL_MS / 1000, watch)
        loop.call_soon(drain)  # what came before the descriptor was watched

    def stop_reading(self) -> None:
        """End `read_on_loop` (on the loop's thread)."""
        reader = self._loop_reader
        if reader is not None:
            self._loop_reader = None
            reader[0].remove_reader(reader[1])
            self._watch.cancel()

    def _send(self, msg: CoreInput) -> None:
        if not self.dead and not self._closing:
            self.inbox.send(self.encode(msg), flags=zmq.NOBLOCK)

    def add_request(
        self,
        request_id: str,
        ids: list[int],
        params: SamplingParams,
        lora_request: LoRARequest | None = None,
    ) -> None:
        self._send(AddRequest(request_id, ids, params, self.index, lora_request))

    def embed(self, request_id: str, prompts: list[list[int]], pooling: str | None) -> None:
        self._send(Embed(request_id, prompts, pooling, self.index))

    def abort(self, request_ids: list[str]) -> None:
        if request_ids:
            self._send(Abort(request_ids))

    def finish_seqs(self, stops: list[tuple[str, int, str]]) -> None:
        if stops:
            self._send(FinishSeqs(stops))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Ask the core to stop, wait for it, then kill it if it hangs. An attached client
        only leaves: the core is its starter's to stop (other clients may still use it)."""
        if self.proc is not None:
            self._send(Shutdown())
        self._closing = True
        if self.proc is not None:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.close()

    def close(self) -> None:
        """Kill the core if it still runs and free the sockets (again: nothing happens)."""
        self._closing = True
        if self.ctx.closed:
            return
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.inbox.close(linger=0)
        self.outbox.close(linger=0)
        self.ctx.term()
        for p in self._paths:
            if os.path.exists(p):
                os.unlink(p)


def _plain(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Engine arguments as JSON values (a torch dtype or device by its name)."""
    return {k: v if v is None or isinstance(v, bool | int | float | str | list | dict) else
            str(v).removeprefix("torch.") for k, v in kwargs.items()}  # fmt: skip


if __name__ == "__main__":  # the engine-core process (started by EngineCoreClient)
    run_engine_core(**json.loads(sys.argv[1]))
