"""AsyncLLM: the engine loop on its own thread, streamed to asyncio callers (the server).

Requests go in through a thread-safe queue; the loop thread steps the LLMEngine and hands each
RequestOutput to the asyncio.Queue of its request via loop.call_soon_threadsafe. Leaving the
`generate` iterator early (break, cancel, client gone) aborts the request and frees its blocks.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from collections.abc import AsyncIterator

from kiln.engine.llm_engine import LLMEngine
from kiln.engine.outputs import RequestOutput
from kiln.engine.sampling_params import SamplingParams
from kiln.errors import KilnError


class EngineStopped(KilnError):
    """A request arrived while the engine drains for shutdown (the server answers 503)."""


class AsyncLLM:
    """AsyncLLM(model_path, **engine_args); `await start()`, `generate(...)`, `abort(id)`."""

    def __init__(self, model: str, dtype=None, device=None, **engine_args):
        self.engine = LLMEngine(model, dtype=dtype, device=device, **engine_args)
        self.tokenizer = self.engine.tokenizer
        self.model_config = self.engine.model_config
        self.max_model_len = self.engine.max_model_len
        self._inbox: queue.Queue = queue.Queue()  # ("add", ...) / ("abort", id) / ("stop",)
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._stopping = False
        self._drain = True
        self._stats: dict = self.engine.stats()

    @property
    def is_running(self) -> bool:
        """Whether the engine loop runs and takes new requests."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="kiln-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, drain: bool = True) -> None:
        """Stop the loop: after finishing what is queued (drain) or aborting it."""
        if self._thread is None:
            return
        self._stopping, self._drain = True, drain
        self._wake.set()
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    async def generate(
        self,
        prompt: str | list[int],
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs after every step that changed the request; the last finished."""
        if self._thread is None:
            await self.start()
        if self._stopping:
            raise EngineStopped("the engine is shutting down")
        request_id = request_id or uuid.uuid4().hex
        text, ids = (prompt, None) if isinstance(prompt, str) else (None, list(prompt))
        params = sampling_params or SamplingParams()
        ids = self.engine.validate_prompt(text, ids)  # InputError before anything is queued
        if request_id in self._streams:
            raise KilnError(f"request id {request_id!r} is already running")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._inbox.put(("add", request_id, text, ids, params))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    break
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request (its blocks are freed on the loop thread)."""
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def stats(self) -> dict:
        return dict(self._stats)

    # ------------------------------------------------------------------ loop thread

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(item)

    def _send(self, request_id: str, item) -> None:
        self._loop.call_soon_threadsafe(self._deliver, request_id, item)

    def _handle_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "add":
                _, rid, text, ids, params = msg
                try:
                    self.engine.add_request(rid, text, params, ids)
                except KilnError as e:
                    self._send(rid, e)
            else:
                self.engine.abort(msg[1])

    def _run(self) -> None:
        engine = self.engine
        while True:
            self._handle_inbox()
            if self._stopping and (not self._drain or not engine.has_unfinished()):
                for rid in list(engine.requests):
                    out = engine.abort(rid)
                    if out is not None:
                        self._send(rid, out)
                break
            if not engine.has_unfinished():
                self._stats = engine.stats()
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = engine.step(stream=True)
            except Exception as e:  # the model failed: fail every request, keep serving
                for rid in list(engine.requests):
                    engine.abort(rid)
                    self._send(rid, e)
                continue
            for out in outputs:
                self._send(out.request_id, out)
            self._stats = engine.stats()
