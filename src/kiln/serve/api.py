"""The FastAPI app: OpenAI's routes over an AsyncLLM, with auth, body limits, admission control,
metrics and OpenAI-shaped errors for every failure."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from kiln.engine.async_engine import EngineDeadError, EngineError, EngineStopped
from kiln.errors import InputError, KilnError
from kiln.serve import serving
from kiln.serve.admission import AdmissionGate
from kiln.serve.lora import LoRARegistry, lora_routes
from kiln.serve.metrics import CONTENT_TYPE, ServerMetrics
from kiln.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    engine_error,
    error_body,
    input_error,
    parse_request,
)
from kiln.serve.rollout import RolloutCollector, RolloutTable
from kiln.serve.serving import ServingContext
from kiln.serve.tools import TOOL_PARSERS

log = logging.getLogger("kiln.serve")

DEFAULT_MAX_QUEUE = 256
DEFAULT_MAX_BODY_BYTES = 4 * 2**20
DEFAULT_STREAM_SEND_TIMEOUT = 60.0  # a stream whose client reads nothing this long is aborted

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before its answer was ready."""


def create_app(
    engine: Any,
    served_model_name: str,
    api_key: str | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    public_metrics: bool = False,
    stream_send_timeout: float = DEFAULT_STREAM_SEND_TIMEOUT,
    request_id_tag: str = "",
    tool_call_parser: str | None = None,
    lora_modules: dict[str, str] | None = None,
    lora_root: str | None = None,
    rollout_config: str | None = None,
    guardrails: str | None = None,
) -> FastAPI:
    """An OpenAI-compatible app over `engine` (an AsyncLLM, started and drained by the app).
    With an `api_key` every route but /health needs it (/metrics too, unless public_metrics).
    `request_id_tag` starts every request id after its kind's prefix ("cmpl-w1-..."): which of
    several API processes served it." With enable_lora, `lora_modules` ({name: dir}) are
    served from the start and more load at run time from under `lora_root`. `guardrails`: a
    config file of input and output checks (kiln.serve.guardrails)."""
    max_running = engine.config.max_num_seqs
    ctx = ServingContext(
        engine=engine,
        model_name=served_model_name,
        metrics=ServerMetrics(engine.stats),
        gate=AdmissionGate(max_running, max_queue),
        stream_send_timeout=stream_send_timeout,
        request_id_tag=request_id_tag,
        tool_parser=TOOL_PARSERS[tool_call_parser]() if tool_call_parser else None,
    )
    if engine.config.enable_lora:
        ctx.adapters = LoRARegistry(engine, served_model_name, lora_root)
        for name, path in (lora_modules or {}).items():
            ctx.adapters.add_static(name, path)
    elif lora_modules:
        raise InputError("--lora-modules needs --enable-lora")
    if rollout_config is not None:  # routes over the base model and the adapters
        known = {served_model_name, *(lora_modules or {})}
        ctx.rollout = RolloutTable.from_file(rollout_config, known)
        ctx.metrics.registry.register(RolloutCollector(ctx.rollout))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        # anyio imports its asyncio backend lazily, at the first streamed response: ~0.1 s of
        # a blocked event loop under the first burst of requests. Import it now.
        async with anyio.create_task_group():
            pass
        yield
        ctx.gate.draining = True
        await engine.shutdown(drain=True, timeout=10)  # uvicorn has drained; a backstop

    app = FastAPI(title="kiln", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx
    _add_error_handlers(app, lambda status: ctx.metrics.errors.labels(str(status)).inc())
    # Routes go on the app's own router: FastAPI matches an included router's routes through
    # a lazy per-request walk (~5% of the API process's CPU under a burst). No key, no
    # dependency to solve per request.
    auth = [Depends(_auth(api_key))] if api_key else []
    router = app.router
    _health_route(router, ctx)
    _ui_route(router)
    _metrics_route(router, ctx, [] if public_metrics else auth)
    _openapi_route(router, app, auth)
    _v1_routes(router, ctx, max_body_bytes, auth)
    _tokenizer_routes(router, ctx, max_body_bytes, auth)
    if ctx.adapters is not None:
        lora_routes(router, ctx.adapters, max_body_bytes, _read_body, auth)
    if guardrails is not None:
        from kiln.serve.guardrails import install

        install(app, guardrails, ctx.metrics.registry, api_key)
    return app


def _health_route(router: APIRouter, ctx: ServingContext) -> None:
    @router.get("/health")
    async def health() -> Response:
        if not ctx.engine.is_running:
            return _error(APIError(503, "the engine is not running", type="service_unavailable"))
        return Response(status_code=200)


def _ui_route(router: APIRouter) -> None:
    """The chat page at / (kiln.serve.ui): static, so open even with an API key (the page asks
    for the key and sends it with its API calls)."""
    from kiln.serve.ui import page

    body, headers = page()

    @router.get("/", include_in_schema=False)
    async def ui() -> HTMLResponse:
        return HTMLResponse(body, headers=headers)


def _metrics_route(router: APIRouter, ctx: ServingContext, deps: list) -> None:
    @router.get("/metrics", dependencies=deps)
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)


def _openapi_route(router: APIRouter, app: FastAPI, deps: list) -> None:
    @router.get("/openapi.json", include_in_schema=False, dependencies=deps)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())


def _v1_routes(router: APIRouter, ctx: ServingContext, max_body_bytes: int, deps: list) -> None:
    @router.get("/v1/models", dependencies=deps)
    async def models() -> ModelList:
        cards = [ModelCard(id=ctx.model_name, max_model_len=ctx.max_model_len)]
        adapters = ctx.adapters.adapters.values() if ctx.adapters is not None else ()
        cards += [ModelCard(id=a.lora_name, max_model_len=ctx.max_model_len, root=a.lora_path,
                            parent=ctx.model_name) for a in adapters]  # fmt: skip
        routes = ctx.rollout.routes if ctx.rollout is not None else {}
        cards += [ModelCard(id=name, max_model_len=ctx.max_model_len) for name in routes]
        return ModelList(data=cards)

    @router.post("/v1/completions", dependencies=deps)
    async def completions(request: Request) -> Response:
        arrival = time.monotonic()
        req = parse_request(CompletionRequest, await _read_body(request, max_body_bytes))
        _check_model(ctx, req.model)
        req.check_supported()
        prompts = await serving.completion_prompts(ctx, req)
        structured = await serving.structured_outputs(req)
        wanted = 1 if req.echo_only else req.max_tokens
        max_tokens = [serving.resolve_max_tokens(ctx, p, wanted, "prompt") for p in prompts]
        extra = dict(prompt_logprobs=req.num_prompt_logprobs, structured_outputs=structured)
        params = [  # each prompt its own room when max_tokens is not given
            serving.sampling_params(
                ctx, {**req.sampling_kwargs(m, req.logprobs), **extra}, req.stream
            )
            for m in max_tokens
        ]
        model, routed = serving.route(ctx, req.model, request.headers)
        job = serving.start_job(ctx, "cmpl", prompts, params, arrival, model, routed)
        job.num_prompt_logprobs = req.prompt_logprobs
        if req.echo:
            job.tracker.echo = await serving.echo_prompts(ctx, req, prompts)
        return await _respond(
            ctx,
            request,
            num_seqs=len(prompts) * req.n,
            job=job,
            stream=req.stream,
            events=lambda job: serving.completion_events(ctx, job, req.include_usage),
            whole=lambda job: serving.completion_response(ctx, job),
        )

    @router.post("/v1/embeddings", dependencies=deps)
    async def embeddings(request: Request) -> Response:
        req = parse_request(EmbeddingRequest, await _read_body(request, max_body_bytes))
        if serving.lora_request(ctx, req.model) is not None:
            raise APIError(400, "embeddings come from the base model, not a LoRA adapter",
                           param="model")  # fmt: skip
        _admit(ctx, 1)  # the core embeds between its steps: one slot while it waits
        try:
            result = await _unless_disconnected(request, serving.embeddings(ctx, req))
        finally:
            ctx.gate.release(1)
        return JSONResponse(result.model_dump())

    @router.post("/v1/chat/completions", dependencies=deps)
    async def chat_completions(request: Request) -> Response:
        arrival = time.monotonic()
        req = parse_request(ChatCompletionRequest, await _read_body(request, max_body_bytes))
        _check_model(ctx, req.model)
        req.check_supported()
        prompt = await serving.chat_prompt(ctx, req)
        structured, tool_stream = await serving.tool_calls(ctx, req)
        if structured is None:
            structured = await serving.structured_outputs(req)
        max_tokens = serving.resolve_max_tokens(ctx, prompt, req.requested_max_tokens, "messages")
        kwargs = req.sampling_kwargs(max_tokens, req.num_logprobs)
        params = serving.sampling_params(
            ctx, {**kwargs, "structured_outputs": structured}, req.stream
        )
        model, routed = serving.route(ctx, req.model, request.headers)
        job = serving.start_job(ctx, "chatcmpl", [prompt], [params], arrival, model, routed)
        job.tool_stream = tool_stream
        return await _respond(
            ctx,
            request,
            num_seqs=req.n,
            job=job,
            stream=req.stream,
            events=lambda job: serving.chat_events(ctx, job, req.include_usage),
            whole=lambda job: serving.chat_response(ctx, job),
        )


def _tokenizer_routes(
    router: APIRouter, ctx: ServingContext, max_body_bytes: int, deps: list
) -> None:
    """vLLM's /tokenize, /detokenize and /tokenizer_info (which lm-evaluation-harness
    reads to use the server's tokenizer)."""

    def tokenizer():
        if ctx.tokenizer is None:
            raise APIError(400, "this model has no tokenizer", param="model")
        return ctx.tokenizer

    @router.post("/tokenize", dependencies=deps)
    async def tokenize(request: Request) -> TokenizeResponse:
        req = parse_request(TokenizeRequest, await _read_body(request, max_body_bytes))
        _check_model(ctx, req.model)
        req.check_supported()
        tok = tokenizer()
        if req.messages is not None:
            # (the template writes its own special tokens: add_special_tokens is a prompt's)
            tools = [t.model_dump(exclude_none=True) for t in req.tools or []] or None
            ids = await serving.render_chat(
                ctx, req.messages, req.add_generation_prompt, tools=tools
            )
        else:
            ids = await asyncio.to_thread(
                tok.encode, req.prompt, add_special_tokens=req.add_special_tokens
            )
        strs = [tok.id_to_token(t) for t in ids] if req.return_token_strs else None
        return TokenizeResponse(
            count=len(ids), max_model_len=ctx.max_model_len, tokens=ids, token_strs=strs
        )

    @router.post("/detokenize", dependencies=deps)
    async def detokenize(request: Request) -> DetokenizeResponse:
        req = parse_request(DetokenizeRequest, await _read_body(request, max_body_bytes))
        _check_model(ctx, req.model)
        tok = tokenizer()
        bad = next((t for t in req.tokens if t >= tok.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"tokens: id {bad} is outside the vocabulary [0, "
                           f"{tok.vocab_size})", param="tokens")  # fmt: skip
        return DetokenizeResponse(prompt=tok.decode(req.tokens, skip_special_tokens=False))

    @router.get("/tokenizer_info", dependencies=deps)
    async def tokenizer_info() -> dict:
        tok = tokenizer()
        return {
            **tok.special_tokens,
            "chat_template": tok.chat_template,
            "model_max_length": ctx.max_model_len,
            "vocab_size": tok.vocab_size,
        }


def _admit(ctx: ServingContext, num_seqs: int) -> None:
    """Take `num_seqs` places at the gate; a refusal (429 full, 503 draining) is counted."""
    try:
        ctx.gate.acquire(num_seqs)
    except APIError as e:
        if e.status in (429, 503):
            ctx.metrics.rejected.labels(e.code).inc()
        raise


async def _respond(
    ctx: ServingContext,
    request: Request,
    num_seqs: int,
    job: serving.Job,
    stream: bool,
    events: Callable[[serving.Job], AsyncIterator[str]],
    whole: Callable[[serving.Job], Awaitable[BaseModel]],
) -> Response:
    """Admit the job, then answer with its event stream or, once finished, its whole result."""
    _admit(ctx, num_seqs)
    job.gate = ctx.gate
    if stream:
        return EventStreamResponse(
            serving.guarded_events(events(job)), job.release_all, ctx.stream_send_timeout
        )
    try:  # a ClientDisconnected (499) or InputError (400) goes to the app's handlers
        result = await _unless_disconnected(request, whole(job))
    finally:
        job.release_all()
    return JSONResponse(result.model_dump())


class StalledReader(Exception):
    """A client left a stream's bytes unread for longer than the send timeout."""


class EventStreamResponse(StreamingResponse):
    """Server-sent events; however the response ends (finished, client gone, a client that
    stopped reading for `send_timeout` s, server error), the event generator is closed, so its
    engine requests are aborted, and admission released."""

    def __init__(self, events: AsyncIterator[str], release, send_timeout: float):
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.release = release
        self.send_timeout = send_timeout

    async def __call__(self, scope, receive, send) -> None:
        # The send deadline: one timer per stream, armed at the first send and re-armed only
        # when it fires during a later send (not a timer per chunk, as asyncio.timeout makes).
        # Like asyncio.timeout it cancels the sending task, and the cancellation it caused
        # becomes StalledReader.
        loop = asyncio.get_running_loop()
        timeout = self.send_timeout
        sending_since: float | None = None  # loop.time() when the send in progress began
        timer: asyncio.TimerHandle | None = None
        task: asyncio.Task | None = None
        expired = False

        def check() -> None:
            nonlocal timer, expired
            timer = None
            if sending_since is None:  # between sends: the next send arms it again
                return
            due = sending_since + timeout
            if loop.time() < due:
                timer = loop.call_at(due, check)
            else:
                expired = True
                task.cancel()

        async def send_or_give_up(message) -> None:
            nonlocal sending_since, timer, task
            task = asyncio.current_task()
            cancelling = task.cancelling()
            sending_since = loop.time()
            if timer is None:
                timer = loop.call_at(sending_since + timeout, check)
            try:
                await send(message)
            except asyncio.CancelledError:
                if expired and task.uncancel() <= cancelling:
                    raise StalledReader from None
                raise
            finally:
                sending_since = None

        try:
            await super().__call__(scope, receive, send_or_give_up)
        except* StalledReader:
            log.info("a client stopped reading its stream for %.0f s: aborted", self.send_timeout)
        finally:
            if timer is not None:
                timer.cancel()
            try:
                await self.body_iterator.aclose()
            finally:
                self.release()


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so aborting its engine requests) if the client leaves."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise ClientDisconnected
    return task.result()


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes, and with 415 when
    it says it is not JSON (so that a web page's form or text/plain post cannot generate)."""
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if kind.lower() != "application/json":
        raise APIError(415, f"the body must be application/json, not {kind!r}",
                       code="unsupported_media_type")  # fmt: skip

    def too_big() -> APIError:  # (made only when raised: an exception costs ~2% under a burst)
        return APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")

    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big()
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_big()
    except ClientDisconnect:  # gone during the upload: nobody to answer, nothing to log
        raise ClientDisconnected from None
    return bytes(body)


def _check_model(ctx: ServingContext, model: str | None) -> None:
    serving.check_model(ctx, model)


def _auth(api_key: str | None):
    """A dependency that demands `Authorization: Bearer <api_key>` (the scheme in any case)
    when a key is set."""
    expected = api_key.encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected)
        if not ok:
            raise APIError(401, "invalid or missing API key", code="invalid_api_key")

    return check


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _add_error_handlers(app: FastAPI, count: Callable[[int], None] = lambda status: None) -> None:
    """OpenAI-shaped bodies for every failure; `count(status)` for each error answered."""

    def counted(response: Response) -> Response:
        count(response.status_code)
        return response

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return counted(_error(e))

    @app.exception_handler(InputError)
    async def bad_input(request: Request, e: InputError) -> JSONResponse:
        return counted(_error(input_error(e)))

    @app.exception_handler(EngineStopped)
    async def stopping(request: Request, e: EngineStopped) -> JSONResponse:
        return counted(
            _error(APIError(503, str(e), type="service_unavailable", headers={"Retry-After": "1"}))
        )

    @app.exception_handler(ClientDisconnected)
    async def gone(request: Request, e: ClientDisconnected) -> Response:
        return Response(status_code=499)

    @app.exception_handler(EngineDeadError)
    @app.exception_handler(EngineError)
    async def engine_failed(request: Request, e: KilnError) -> JSONResponse:
        return counted(_error(engine_error(e)))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return counted(_error(APIError(400, "invalid request")))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(e.detail), kind), status_code=e.status_code, headers=e.headers
        )

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        log.error("request failed", exc_info=e)
        body = error_body("internal server error", "server_error", code="internal_error")
        return counted(JSONResponse(body, status_code=500))
