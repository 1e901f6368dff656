"""From a validated OpenAI request to engine requests and back: prompts, sampling parameters,
the engine streams (tracked for metrics, aborted when dropped), and the OpenAI-shaped answers,
whole or as server-sent events."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel

from kiln.engine.async_engine import EngineDeadError, EngineError
from kiln.errors import InputError, TokenizerError
from kiln.serve.admission import AdmissionGate
from kiln.serve.deltas import (
    Delta,
    DeltaTracker,
    Echo,
    chat_logprobs,
    completion_logprobs,
    token_decoder,
    vllm_prompt_logprobs,
)
from kiln.serve.metrics import ServerMetrics
from kiln.serve.protocol import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    UsageInfo,
    engine_error,
    error_body,
    input_error,
)
from kiln.serve.rollout import Outcome
from kiln.serve.tools import (
    NamedStream,
    RequiredStream,
    ToolParser,
    merge_fragments,
    required_schema,
)

log = logging.getLogger("kiln.serve")


@dataclass
class ServingContext:
    """What every route shares: the engine, the served name, metrics, admission."""

    engine: Any  # kiln.engine.async_engine.AsyncLLM
    model_name: str
    metrics: ServerMetrics
    gate: AdmissionGate
    stream_send_timeout: float = 60.0
    request_id_tag: str = ""  # "w1-": which of several API processes made the id
    tool_parser: ToolParser | None = None  # --tool-call-parser: finds calls in free text
    adapters: Any = None  # kiln.serve.lora.LoRARegistry when the engine serves LoRA
    rollout: Any = None  # kiln.serve.rollout.RolloutTable (--rollout-config)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len


# ---- prompts and parameters ---------------------------------------------------------------


async def completion_prompts(ctx: ServingContext, req: CompletionRequest) -> list[list[int]]:
    """Token ids of each prompt in the batch (strings tokenized off the event loop)."""
    prompts = req.prompts()
    tok = ctx.tokenizer
    texts = [p for p in prompts if isinstance(p, str)]
    if texts and tok is None:
        raise APIError(400, "this model has no tokenizer: give the prompt as token ids",
                       param="prompt")  # fmt: skip
    limit = ctx.max_model_len * ctx.engine.max_token_bytes
    if any(len(t) > limit for t in texts):  # too long however it tokenizes: refuse it cheaply
        raise APIError(
            400, f"this model's maximum context length is {ctx.max_model_len} tokens, and the "
            f"prompt has more than {limit} characters", param="prompt",
            code="context_length_exceeded",
        )  # fmt: skip

    def encode() -> list[list[int]]:
        return [tok.encode(p) if isinstance(p, str) else list(p) for p in prompts]

    if not texts:  # token ids only: nothing to tokenize, no thread hand-off (~50 us of loop)
        return encode()
    return await asyncio.to_thread(encode)


async def echo_prompts(
    ctx: ServingContext, req: CompletionRequest, prompts: list[list[int]]
) -> Echo:
    """What `echo` puts in front of each choice: the prompt as given (token-id prompts
    decoded), and its ids."""

    def texts() -> list[str]:
        return [p if isinstance(p, str) else ctx.tokenizer.decode(ids, skip_special_tokens=False)
                for p, ids in zip(req.prompts(), prompts)]  # fmt: skip

    if ctx.tokenizer is None:
        raise APIError(400, "echo needs a tokenizer; this model has none", param="echo")
    return Echo(await asyncio.to_thread(texts), prompts, generate=not req.echo_only)


async def chat_prompt(ctx: ServingContext, req: ChatCompletionRequest) -> list[int]:
    """The conversation rendered by the model's chat template (with the request's tools), as
    token ids."""
    tools = [{"type": "function", "function": f} for f in req.tool_functions()] or None
    return await render_chat(ctx, req.messages, req.add_generation_prompt, tools=tools)


async def tool_calls(ctx: ServingContext, req: ChatCompletionRequest):
    """How the request's tools are used: (the structured outputs that force a call or None,
    a factory of per-choice streams that find the calls or None)."""
    from kiln.engine.structured import StructuredOutputsParams, check_structured_outputs

    mode = req.tool_mode
    if mode == "none":
        return None, None
    if mode == "auto":
        if ctx.tool_parser is None:
            raise APIError(400, "tool_choice auto needs the server started with "
                           "--tool-call-parser", param="tool_choice")  # fmt: skip
        return None, ctx.tool_parser.stream
    if req.structured() is not None:
        raise APIError(400, f"tool_choice {mode!r} constrains the output itself: no "
                       "response_format or structured outputs beside it",
                       param="tool_choice")  # fmt: skip
    functions = req.tool_functions()
    if mode == "required":
        schema, make = required_schema(functions, req.parallel_tool_calls), RequiredStream
    else:
        name = req.tool_choice.function.name
        (f,) = [f for f in functions if f["name"] == name]
        schema = f.get("parameters") or {"type": "object"}
        make = lambda: NamedStream(name)  # noqa: E731
    try:
        params = StructuredOutputsParams(json=schema)
        await asyncio.to_thread(check_structured_outputs, params)
    except InputError as e:
        raise APIError(400, f"tools: a function's parameters: {e}", param="tools") from None
    return params, make


async def render_chat(
    ctx: ServingContext, chat: list, add_generation_prompt: bool, **kwargs: Any
) -> list[int]:
    """Messages (ChatMessage) rendered by the model's chat template, as token ids; template
    keyword arguments (tools) passed on."""
    messages = [m.to_template() for m in chat]
    tok = ctx.tokenizer
    if tok is None or tok.chat_template is None:
        raise APIError(400, "this model has no chat template: use /v1/completions",
                       param="messages")  # fmt: skip

    def render() -> list[int]:
        return tok.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, **kwargs
        )

    try:
        return await asyncio.to_thread(render)
    except TokenizerError as e:
        raise APIError(400, str(e), param="messages") from None


def resolve_max_tokens(
    ctx: ServingContext, prompt: list[int], max_tokens: int | None, param: str
) -> int:
    """Check a prompt against the context and vocabulary (the engine's check: its InputError
    is a 400 naming `param`); return the max_tokens to use."""
    ctx.engine.check_prompt(prompt, param)
    limit = ctx.max_model_len
    n = len(prompt)
    if max_tokens is None:
        return limit - n
    if n + max_tokens > limit:
        raise APIError(
            400,
            f"this model's maximum context length is {limit} tokens, but you asked for "
            f"{n + max_tokens} ({n} in the {param}, {max_tokens} to generate)",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return max_tokens


async def structured_outputs(req: Any):
    """The request's StructuredOutputsParams (None: free text), checked off the event loop;
    a spec that does not compile is a 400 naming the field it came in."""
    from kiln.engine.structured import StructuredOutputsParams, check_structured_outputs

    found = req.structured()
    if found is None:
        return None
    kwargs, param = found
    try:
        params = StructuredOutputsParams(**kwargs)
        await asyncio.to_thread(check_structured_outputs, params)
    except InputError as e:
        raise APIError(400, f"{param}: {e}", param=param) from None
    return params


def sampling_params(ctx: ServingContext, kwargs: dict[str, Any], stream: bool):
    """kiln's SamplingParams (delta outputs when streamed, one final output otherwise); its
    range checks become 400s."""
    from kiln.engine.sampling_params import RequestOutputKind, SamplingParams

    kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
    try:
        params = SamplingParams(**kwargs, output_kind=kind)
        ctx.engine.check_params(params)
    except InputError as e:
        raise input_error(e) from None
    return params


# ---- engine streams -----------------------------------------------------------------------


def route(ctx: ServingContext, model: str | None, headers) -> tuple[str | None, Any]:
    """(the model that serves the request, (route, version) or None): a rollout route's name
    picks a version by its weights (the same one for the same sticky header value)."""
    table = ctx.rollout
    if table is None or model not in table.routes:
        return model, None
    version = table.pick(model, headers.get(table.routes[model].sticky_header))
    return version, (model, version)


async def _shadow(ctx: ServingContext, prompt, params, target: str, public: str) -> None:
    """A copy of a request for a shadow target: measured, its answer discarded."""
    from kiln.engine.sampling_params import RequestOutputKind

    params = dataclasses.replace(params, output_kind=RequestOutputKind.FINAL_ONLY)
    try:
        stream = run_request(
            ctx, prompt, params, new_id("shadow", ctx.request_id_tag), time.monotonic(),
            lora_request=lora_request(ctx, target), routed=(public, target),
        )  # fmt: skip
        async for _ in stream:
            pass
    except Exception as e:  # the client never sees a shadow's failure; the table does
        log.info("shadow %s of %s failed: %s", target, public, e)


def check_model(ctx: ServingContext, model: str | None) -> None:
    """404 unless `model` is the base model, a served adapter or a rollout route."""
    if ctx.rollout is None or model not in ctx.rollout.routes:
        lora_request(ctx, model)


def lora_request(ctx: ServingContext, model: str | None):
    """The LoRARequest of the adapter `model` names; None for the base model (or no name);
    404 for a name the server does not serve."""
    if model is None or model == ctx.model_name:
        return None
    lora = ctx.adapters.get(model) if ctx.adapters is not None else None
    if lora is None:
        raise APIError(
            404,
            f"the model {model!r} does not exist; this server serves {ctx.model_name!r}",
            param="model",
            code="model_not_found",
        )
    return lora


def new_id(prefix: str, tag: str = "") -> str:
    return f"{prefix}-{tag}{uuid.uuid4().hex}"


async def run_request(
    ctx: ServingContext, prompt: list[int], params, request_id: str, arrival: float,
    on_end: Callable[[], None] = lambda: None, lora_request: Any = None,
    routed: tuple[str, str] | None = None,
) -> AsyncIterator[Any]:  # fmt: skip
    """The engine's outputs for one prompt; records latencies and finish reasons. Closing
    the engine's stream early (disconnect, error, cancellation) aborts the request."""
    first_token = None
    tokens: dict[int, int] = {}
    finished = failed = False
    logprob = None  # the first completion's cumulative logprob (rollout's quality signal)
    stream = ctx.engine.generate(prompt, params, request_id, lora_request=lora_request)
    try:
        async for out in stream:
            for c in out.outputs:
                if c.token_ids and first_token is None:
                    first_token = time.monotonic()
                tokens[c.index] = tokens.get(c.index, 0) + len(c.token_ids)
                if c.finish_reason:
                    ctx.metrics.finished.labels(c.finish_reason).inc()
                if c.index == 0:
                    logprob = c.cumulative_logprob
            finished = out.finished
            yield out
    except Exception:
        failed = True
        raise
    finally:
        if routed is not None and (finished or failed):
            n = tokens.get(0, 0)
            mean = logprob / n if logprob is not None and n else None
            outcome = Outcome(finished, time.monotonic() - arrival, mean, n)
            ctx.rollout.record(*routed, outcome)
        await stream.aclose()
        on_end()
        if finished:
            num_tokens = max(tokens.values(), default=0)
            ctx.metrics.observe_request(arrival, first_token, time.monotonic(), num_tokens)
        else:
            ctx.metrics.finished.labels("abort").inc()


_DONE = object()


async def merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several async iterators as (which, item), in arrival order."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as stream:
            async for item in stream:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
            await queue.put((i, _DONE))
        except Exception as e:  # handed to the consumer, which re-raises it
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sse(payload: BaseModel | dict[str, Any]) -> str:
    """One server-sent event."""
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json()}\n\n"
    return f"data: {json.dumps(payload)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def guarded_events(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream that ends with an error event, never a traceback, when something fails."""
    try:
        async with aclosing(events):
            async for event in events:
                yield event
    except APIError as e:
        yield sse(e.body())
    except InputError as e:
        yield sse(input_error(e).body())
    except (EngineDeadError, EngineError) as e:
        yield sse(engine_error(e).body())
    except Exception:
        log.exception("streaming request failed")
        yield sse(error_body("internal server error", "server_error", code="internal_error"))
    yield SSE_DONE


# ---- /v1/embeddings ------------------------------------------------------------------------


async def embeddings(ctx: ServingContext, req: EmbeddingRequest) -> EmbeddingResponse:
    """OpenAI's embeddings: each input's pooled hidden state, normalized (after keeping the
    first `dimensions`), as floats or base64 float32."""
    from kiln.engine.pooling import normalize

    hidden = ctx.engine.model_config.hidden_size
    if req.dimensions is not None and req.dimensions > hidden:
        raise APIError(400, f"dimensions: at most {hidden} (the model's hidden size), got "
                       f"{req.dimensions}", param="dimensions")  # fmt: skip
    inputs = req.inputs()
    tok = ctx.tokenizer
    if any(isinstance(p, str) for p in inputs) and tok is None:
        raise APIError(400, "this model has no tokenizer: give the input as token ids",
                       param="input")  # fmt: skip
    ids = await asyncio.to_thread(lambda: [tok.encode(p) if isinstance(p, str) else list(p)
                                           for p in inputs])  # fmt: skip
    for p in ids:
        ctx.engine.check_prompt(p, "input")
    vecs = await ctx.engine.embed(ids, request_id=new_id("embd", ctx.request_id_tag))
    data = []
    for i, v in enumerate(vecs):
        v = normalize(v, req.dimensions)
        if req.encoding_format == "base64":
            v = base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()
        data.append(EmbeddingData(embedding=v, index=i))
    n = sum(len(p) for p in ids)
    return EmbeddingResponse(data=data, model=ctx.model_name,
                             usage=UsageInfo(prompt_tokens=n, total_tokens=n))  # fmt: skip


# ---- /v1/completions ----------------------------------------------------------------------


@dataclass
class Job:
    """One HTTP request's work for the engine: a stream per prompt, and the admission slots
    each holds until its engine work ends (not until the client has read it all)."""

    request_id: str
    streams: list[AsyncIterator[Any]]
    tracker: DeltaTracker
    num_logprobs: int | None
    held: list[int]  # admitted sequences per stream, until it ends
    prompts: list[list[int]] = field(default_factory=list)
    num_prompt_logprobs: int | None = None  # vLLM's prompt_logprobs field, when asked
    tool_stream: Callable[[], Any] | None = None  # chat with tools: a call finder per choice
    gate: AdmissionGate | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def release(self, i: int) -> None:
        """Stream i's engine request is over: its sequences leave the admission count."""
        if self.gate is not None and self.held[i]:
            self.gate.release(self.held[i])
        self.held[i] = 0

    def release_all(self) -> None:
        for i in range(len(self.held)):
            self.release(i)


def start_job(
    ctx: ServingContext, prefix: str, prompts: list[list[int]], params: list, arrival: float,
    model: str | None = None, routed: tuple[str, str] | None = None,
) -> Job:  # fmt: skip
    """Engine streams for each prompt and its params (nothing runs until they are iterated),
    with the LoRA adapter `model` names, if it names one. `routed`: (route, version) the
    rollout table chose (outcomes recorded there; copies go to the route's shadows)."""
    lora = lora_request(ctx, model)
    if routed is not None:
        for target in ctx.rollout.routes[routed[0]].shadow:
            for p, sp in zip(prompts, params):
                task = asyncio.create_task(_shadow(ctx, p, sp, target, routed[0]))
                ctx.rollout.shadows.add(task)  # (a task nobody holds may be collected)
                task.add_done_callback(ctx.rollout.shadows.discard)
    request_id = new_id(prefix, ctx.request_id_tag)
    job = Job(request_id, [], DeltaTracker(params[0].n, [len(p) for p in prompts]),
              params[0].logprobs, [p.n for p in params], prompts)  # fmt: skip
    job.streams = [
        run_request(
            ctx, p, sp, f"{request_id}-{i}", arrival, lambda i=i: job.release(i), lora, routed
        )  # fmt: skip
        for i, (p, sp) in enumerate(zip(prompts, params))
    ]
    return job


def _completion_choice(decode, job: Job, d: Delta, offset: int = 0) -> CompletionChoice:
    logprobs = plp = None
    if job.num_logprobs is not None:
        logprobs = completion_logprobs(decode, d, job.num_logprobs, offset)
    if job.num_prompt_logprobs is not None and d.prompt_logprobs is not None:
        ids = job.prompts[d.index // job.tracker.n]
        plp = vllm_prompt_logprobs(decode, ids, d.prompt_logprobs, job.num_prompt_logprobs)
    return CompletionChoice(
        index=d.index,
        text=d.text,
        logprobs=logprobs,
        finish_reason=d.finish_reason,
        stop_reason=d.stop_reason,
        prompt_logprobs=plp,
    )


def _chat_logprobs(decode, job: Job, d: Delta) -> ChatLogprobs | None:
    return None if job.num_logprobs is None else chat_logprobs(decode, d, job.num_logprobs)


async def _final_deltas(job: Job) -> list[Delta]:
    """Every choice's whole output, once all have finished, in index order."""
    final: dict[int, Any] = {}
    async with aclosing(merge(job.streams)) as outputs:
        async for i, out in outputs:
            final[i] = out
    deltas = [d for i in sorted(final) for d in job.tracker.deltas(i, final[i])]
    return sorted(deltas, key=lambda d: d.index)


async def completion_events(ctx: ServingContext, job: Job, include_usage: bool):
    """SSE events of a streamed completion: a chunk per choice delta, then usage."""
    decode = token_decoder(ctx.tokenizer)
    offsets: dict[int, int] = {}

    def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
        return sse(
            CompletionResponse(
                id=job.request_id,
                created=job.created,
                model=ctx.model_name,
                choices=choices,
                usage=usage,
            )
        )

    async with aclosing(merge(job.streams)) as outputs:
        async for i, out in outputs:
            for d in job.tracker.deltas(i, out):
                yield chunk([_completion_choice(decode, job, d, offsets.get(d.index, 0))])
                offsets[d.index] = offsets.get(d.index, 0) + len(d.text)
    if include_usage:
        yield chunk([], job.tracker.usage())


async def completion_response(ctx: ServingContext, job: Job) -> CompletionResponse:
    """The whole completion, once every choice has finished."""
    decode = token_decoder(ctx.tokenizer)
    choices = [_completion_choice(decode, job, d) for d in await _final_deltas(job)]
    return CompletionResponse(
        id=job.request_id,
        created=job.created,
        model=ctx.model_name,
        choices=choices,
        usage=job.tracker.usage(),
    )


# ---- /v1/chat/completions -----------------------------------------------------------------


async def chat_events(ctx: ServingContext, job: Job, include_usage: bool):
    """SSE events of a streamed chat completion: each choice's role, then content deltas
    (with tools: the calls found, as delta.tool_calls fragments)."""
    decode = token_decoder(ctx.tokenizer)
    finders: dict[int, Any] = {}
    called: set[int] = set()

    def chunk(choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> str:
        return sse(
            ChatCompletionChunk(
                id=job.request_id,
                created=job.created,
                model=ctx.model_name,
                choices=choices,
                usage=usage,
            )
        )

    for i in range(job.tracker.n):
        yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
    async with aclosing(merge(job.streams)) as outputs:
        async for i, out in outputs:
            for d in job.tracker.deltas(i, out):
                delta = DeltaMessage(content=d.text)
                if job.tool_stream is not None:
                    finder = finders.setdefault(d.index, job.tool_stream())
                    content, frags = finder.feed(d.text, final=d.finish_reason is not None)
                    delta = DeltaMessage(content=content or None, tool_calls=frags or None)
                    called.update([d.index] if frags else [])
                choice = ChatChunkChoice(
                    index=d.index,
                    delta=delta,
                    logprobs=_chat_logprobs(decode, job, d),
                    finish_reason=_finish(d.finish_reason, d.index in called),
                    stop_reason=d.stop_reason,
                )
                yield chunk([choice])
    if include_usage:
        yield chunk([], job.tracker.usage())


def _finish(reason: str | None, called: bool) -> str | None:
    """OpenAI's finish_reason: "tool_calls" when a choice that called tools ended by itself."""
    return "tool_calls" if called and reason == "stop" else reason


def _message(job: Job, d: Delta) -> tuple[AssistantMessage, str | None]:
    """A whole choice's message (tool calls pulled out of the text) and finish_reason."""
    if job.tool_stream is None:
        return AssistantMessage(content=d.text), d.finish_reason
    finder = job.tool_stream()
    content, frags = finder.feed(d.text)
    rest, more = finder.feed("", final=True)
    calls = merge_fragments(frags + more)
    content += rest
    message = AssistantMessage(content=content or None if calls else content, tool_calls=calls)
    return message, _finish(d.finish_reason, bool(calls))


async def chat_response(ctx: ServingContext, job: Job) -> ChatCompletionResponse:
    """The whole chat completion, once every choice has finished."""
    decode = token_decoder(ctx.tokenizer)
    choices = []
    for d in await _final_deltas(job):
        message, finish = _message(job, d)
        choices.append(
            ChatChoice(
                index=d.index,
                message=message,
                logprobs=_chat_logprobs(decode, job, d),
                finish_reason=finish,
                stop_reason=d.stop_reason,
            )
        )
    return ChatCompletionResponse(
        id=job.request_id,
        created=job.created,
        model=ctx.model_name,
        choices=choices,
        usage=job.tracker.usage(),
    )
