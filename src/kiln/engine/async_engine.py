"""AsyncLLM: the server's engine. The engine core runs in its own process; this side (the API
process) tokenizes, detokenizes and streams.

`generate` checks and tokenizes the prompt here, sends the request to the core, and yields the
RequestOutputs that the OutputProcessor builds from the core's per-step deltas. Outputs a slow
consumer has not taken yet are merged (DELTA: concatenated; otherwise the newest replaces the
older), so a stalled client holds one pending output, not one per step. Leaving the iterator
early (break, cancel, client gone) aborts the request in the core and frees its blocks.

A request with `use_beam_search` is a client of the engine (kiln.engine.beam_search): each beam
step runs one ordinary request per live beam through the same path, and the one output comes
when the search ends; leaving early aborts the step in flight.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from pathlib import Path
from typing import Any

from kiln.config import ModelConfig
from kiln.engine.beam_search import BeamSearch
from kiln.engine.config import EngineConfig
from kiln.engine.core import check_prompt_ids, eos_ids_from_dir
from kiln.engine.core_client import (
    CoreOutputs,
    EngineCoreClient,
    EngineDeadError,
    EngineStopped,
)
from kiln.engine.llm_engine import check_params, encode_prompt, load_engine_tokenizer
from kiln.engine.lora import LoRARequest
from kiln.engine.output_processor import OutputProcessor
from kiln.engine.outputs import RequestOutput
from kiln.engine.sampling_params import RequestOutputKind, SamplingParams
from kiln.errors import InputError, KilnError

__all__ = ["AsyncLLM", "EngineDeadError", "EngineStopped"]


class EngineError(KilnError):
    """The engine failed this request (the model raised, or the core refused it)."""


class OutputCollector:
    """The outputs of one request that its consumer has not taken yet, merged."""

    __slots__ = ("kind", "output", "error", "_waiter")

    def __init__(self, kind: RequestOutputKind):
        self.kind = kind
        self.output: RequestOutput | None = None
        self.error: BaseException | None = None
        self._waiter: asyncio.Future | None = None  # the consumer's, while it waits

    def put(self, out: RequestOutput) -> None:
        if self.output is None or self.kind != RequestOutputKind.DELTA:
            self.output = out
        else:
            merge_delta(self.output, out)
        self._wake()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> RequestOutput:
        # a bare future per wait, not an asyncio.Event: one consumer, woken once per step
        while self.output is None:
            if self.error is not None:
                raise self.error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        out, self.output = self.output, None
        return out


def merge_delta(into: RequestOutput, new: RequestOutput) -> None:
    """Fold a later delta output into an earlier one that nobody has taken yet (in place:
    the earlier output's lists are its own)."""
    by_index = {c.index: c for c in into.outputs}
    for c in new.outputs:
        old = by_index.get(c.index)
        if old is None:
            into.outputs.append(c)
            by_index[c.index] = c
            continue
        old.text += c.text
        old.token_ids.extend(c.token_ids)
        if old.logprobs is not None and c.logprobs is not None:
            old.logprobs.extend(c.logprobs)
        old.finish_reason, old.stop_reason = c.finish_reason, c.stop_reason
        old.cumulative_logprob = c.cumulative_logprob
    if len(into.outputs) > 1:
        into.outputs.sort(key=lambda c: c.index)
    into.finished = new.finished
    if into.prompt_logprobs is None:
        into.prompt_logprobs = new.prompt_logprobs


async def gather_or_cancel(steps: list[Awaitable]) -> list:
    """Await every step; when one fails or the caller is cancelled, cancel the others and
    wait for them (so their requests are aborted before this returns)."""
    tasks = [asyncio.ensure_future(s) for s in steps]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def max_token_bytes(tokenizer) -> int:
    """An upper bound on the UTF-8 bytes of text one token covers (its vocabulary entry's
    bytes: byte-level and metaspace entries spell a byte or a space with more)."""
    return max(len(t.encode()) for t in tokenizer.tokenizer.get_vocab(with_added_tokens=True))


def eos_token_ids(path: Path, tokenizer, model_config: ModelConfig) -> frozenset[int]:
    """The ids that end a sequence: the tokenizer's, else those the checkpoint names."""
    if tokenizer is not None:
        return frozenset(tokenizer.eos_token_ids)
    return frozenset(eos_ids_from_dir(path, model_config))


class AsyncLLM:
    """AsyncLLM(model_path, **engine_args); `await start()`, `generate(...)`, `abort(id)`.
    With `attach=dict(addrs=, index=, core_pid=)` it talks to an engine core another process
    started (EngineCoreClient.attach) instead of starting its own; the engine arguments must be
    the core's (they shape the checks made here)."""

    def __init__(self, model: str, dtype=None, device=None, attach: dict | None = None,
                 **engine_args):  # fmt: skip
        path = Path(model)
        self.config = EngineConfig.from_kwargs(engine_args)  # bad arguments fail here, fast
        self.model_config = ModelConfig.from_dir(path)
        self.tokenizer = load_engine_tokenizer(path)
        self.eos_token_ids = eos_token_ids(path, self.tokenizer, self.model_config)
        eos = sorted(self.eos_token_ids)
        kwargs = dict(engine_args, dtype=dtype, device=device, eos_token_ids=eos)
        if attach is None:
            self.client = EngineCoreClient(str(model), **kwargs)  # starts the core, waits for it
        else:
            self.client = EngineCoreClient.attach(**attach)
        self.max_model_len: int = self.client.info["max_model_len"]
        self.processor = OutputProcessor(self.tokenizer)
        # no token is longer than this many UTF-8 bytes of its vocabulary entry: a text of more
        # than max_model_len times it is too long without tokenizing it
        self.max_token_bytes = max_token_bytes(self.tokenizer) if self.tokenizer else 0
        self._collectors: dict[str, OutputCollector] = {}
        self._searches: set[str] = set()  # request ids of the running beam searches
        self._embeds: dict[str, asyncio.Future] = {}  # embedding requests awaiting the core
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._idle = asyncio.Event()
        self.on_dead: list[Any] = []  # callbacks(exitcode) once the core process is gone

    @property
    def is_running(self) -> bool:
        """Whether the engine core runs and takes new requests."""
        return self._loop is not None and not self.client.dead and not self._stopping

    async def start(self) -> None:
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self.client.read_on_loop(self._loop, self._on_message, self._on_dead)

    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop: after what is in flight finishes (drain, at most `timeout` s) or at once;
        what is left is aborted, then the core process exits."""
        self._stopping = True
        if drain and (self._collectors or self._searches) and not self.client.dead:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                pass
        for rid in list(self._collectors):
            self.abort(rid)
        self.client.stop_reading()
        await asyncio.to_thread(self.client.shutdown)

    async def _ready(self) -> None:
        """Start on first use; EngineDeadError / EngineStopped when no request may start."""
        if self._loop is None:
            await self.start()
        if self.client.dead:
            raise EngineDeadError("the engine core is not running")
        if self._stopping:
            raise EngineStopped("the engine is shutting down")

    async def generate(
        self,
        prompt: str | list[int],
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """The request's outputs as they come (shaped by params.output_kind); the last is
        finished. Outputs the caller has not taken yet are merged. With `lora_request` it
        runs with that adapter (the core reads it; a bad one fails the request)."""
        await self._ready()
        request_id = request_id or uuid.uuid4().hex
        text, ids = (prompt, None) if isinstance(prompt, str) else (None, list(prompt))
        params = sampling_params or SamplingParams()
        ids = encode_prompt(
            self.tokenizer, text, ids, self.max_model_len, self.model_config.vocab_size
        )
        self.check_params(params)
        if request_id in self._collectors or request_id in self._searches:
            raise KilnError(f"request id {request_id!r} is already running")
        if params.use_beam_search:
            if lora_request is not None:
                raise InputError("beam search with a LoRA adapter is not supported", "model")
            outputs = self._beam_search(request_id, text, ids, params)
        else:
            outputs = self._request(request_id, text, ids, params, lora_request)
        async with aclosing(outputs):
            async for out in outputs:
                yield out

    async def _request(
        self,
        request_id: str,
        text: str | None,
        ids: list[int],
        params: SamplingParams,
        lora_request: LoRARequest | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """One checked request through the core: its outputs as they come."""
        if self.client.dead:
            raise EngineDeadError("the engine core is not running")
        collector = OutputCollector(params.output_kind)
        self._collectors[request_id] = collector
        self.processor.add_request(request_id, text, ids, params)
        self.client.add_request(request_id, ids, params, lora_request)
        finished = False
        try:
            while not finished:
                out = await collector.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)
            else:
                self._forget(request_id)

    async def _beam_search(
        self, request_id: str, text: str | None, ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """One beam search: its steps' beam requests through `_request`, one output at the end."""
        search = BeamSearch(ids, params, self.eos_token_ids, self.max_model_len)
        self._searches.add(request_id)
        try:
            while not search.finished:
                beams = [
                    self._final_output(sub_id, prompt, search.step_params)
                    for sub_id, prompt in search.step_requests(request_id)
                ]
                search.advance(await gather_or_cancel(beams))
        finally:
            self._searches.discard(request_id)
            self._forget(request_id)
        yield search.output(self.tokenizer, request_id, text)

    async def _final_output(
        self, request_id: str, ids: list[int], params: SamplingParams
    ) -> RequestOutput:
        """The one output of a FINAL_ONLY request."""
        async with aclosing(self._request(request_id, None, ids, params)) as outputs:
            (out,) = [o async for o in outputs]
        return out

    async def embed(
        self, prompts: list[list[int]], pooling: str | None = None, request_id: str | None = None
    ) -> list[list[float]]:
        """Each prompt's pooled final hidden state (not normalized: kiln.engine.pooling),
        computed by the core between its steps."""
        await self._ready()
        for ids in prompts:
            self.check_prompt(ids)
        request_id = request_id or uuid.uuid4().hex
        fut = self._embeds[request_id] = self._loop.create_future()
        self.client.embed(request_id, prompts, pooling)
        try:
            return await fut
        finally:
            self._embeds.pop(request_id, None)

    def check_prompt(self, ids: list[int], param: str = "prompt") -> list[int]:
        """`ids` if they fit the context and the vocabulary, else InputError naming `param`."""
        return check_prompt_ids(ids, self.max_model_len, self.model_config.vocab_size, param)

    def check_params(self, params: SamplingParams) -> None:
        """InputError for settings this engine can never serve (before anything is sent)."""
        check_params(self.tokenizer, params, self.config.max_num_seqs, self.config.kv_eviction)

    def abort(self, request_id: str) -> None:
        """Abort a request: the core frees its blocks; nothing more comes out of it."""
        if self._collectors.get(request_id) is None:
            return
        self.processor.abort(request_id)
        self.client.abort([request_id])
        self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        self._collectors.pop(request_id, None)
        if not self._collectors and not self._searches:
            self._idle.set()

    def stats(self) -> dict:
        return dict(self.client.stats)

    # ------------------------------------------------------------------ from the core (on the loop)

    def _on_message(self, msg: CoreOutputs) -> None:
        if msg.deltas:
            outputs, stops = self.processor.process(msg.deltas)
            for out in outputs:
                collector = self._collectors.get(out.request_id)
                if collector is not None:
                    collector.put(out)
            self.client.finish_seqs([(s.request_id, s.index, s.stop) for s in stops])
        for rid, vecs in msg.embeddings:
            fut = self._embeds.get(rid)
            if fut is not None and not fut.done():
                fut.set_result(vecs)
        for rid, why in msg.errors:
            fut = self._embeds.get(rid)
            if fut is not None and not fut.done():
                fut.set_exception(InputError(why))
            self.processor.abort(rid)
            collector = self._collectors.get(rid)
            if collector is not None:
                collector.fail(EngineError(why))

    def _on_dead(self, exitcode: int | None) -> None:
        error = EngineDeadError(f"the engine core process exited (code {exitcode})")
        for fut in self._embeds.values():
            if not fut.done():
                fut.set_exception(error)
        for rid, collector in list(self._collectors.items()):
            self.processor.abort(rid)
            collector.fail(error)
        for callback in self.on_dead:
            callback(exitcode)
