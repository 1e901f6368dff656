"""OpenAI's wire format: request schemas that validate at the boundary, response schemas, errors.

Field names and ranges follow OpenAI's API; the extra sampling fields (top_k, min_p,
repetition_penalty, ignore_eos, ...) take vLLM's names. Unknown fields are ignored, as vLLM does.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

from kiln.engine.sampling_params import MAX_LOGPROBS
from kiln.errors import ContextLengthError, InputError

MAX_SEED = 2**63 - 1
MAX_N = 128
MAX_STOP = 16


class APIError(Exception):
    """An error the server answers with, in OpenAI's JSON shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_error(e: ValidationError) -> APIError:
    """The most specific problem pydantic found, as a 400 naming the field."""

    def where(err: dict[str, Any]) -> list[str]:  # the location without union members' tags
        return [str(x) for x in err.get("loc", ()) if not _is_type_tag(x)]

    def specificity(err: dict[str, Any]) -> tuple[int, bool]:  # deepest; a broken limit
        return len(where(err)), not err.get("type", "").endswith("_type")  # over a wrong type

    err = max(e.errors(include_url=False), key=specificity)
    if err.get("type") == "json_invalid":
        return APIError(
            400, f"request body is not valid JSON: {err.get('msg')}", code="json_invalid"
        )
    param = ".".join(where(err)) or None
    prefix = f"{param}: " if param else ""
    return APIError(400, f"{prefix}{err.get('msg')}", param=param, code=err.get("type"))


def _is_type_tag(part: Any) -> bool:
    """Pydantic names union members in error locations ("str", "list[int]", "constrained-str")."""
    return isinstance(part, str) and (
        "[" in part or "-" in part or part in ("str", "int", "float", "bool", "list", "dict")
    )


class _Request(BaseModel):
    # strict: no "1" -> 1 or 1 -> True coercions; a float field still takes an int.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool = False


Stop = Annotated[str, Field(min_length=1)]


class JsonSchemaFormat(_Request):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    """OpenAI's response_format: text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Request):
    """vLLM's structured_outputs: exactly one of json, regex, choice, grammar, json_object."""

    json_: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False


class SamplingFields(_Request):
    """The sampling fields both endpoints share."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    seed: int | None = Field(None, ge=-MAX_SEED - 1, le=MAX_SEED)
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: (
        Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_STOP)] | None
    ) = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    use_beam_search: bool = False  # vLLM's: n beams, the n best returned
    length_penalty: float = Field(1.0, gt=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older
    # guided_* fields (one source per request)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def structured(self) -> tuple[dict[str, Any], str] | None:
        """The request's grammar as StructuredOutputsParams keyword arguments, and the
        field it came from (named by a 400 when it does not compile)."""
        found: list[tuple[dict[str, Any], str]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(({"json_object": True}, "response_format"))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise APIError(400, "response_format: json_schema needs a schema",
                               param="response_format.json_schema.schema")  # fmt: skip
            found.append(({"json": rf.json_schema.schema_}, "response_format.json_schema.schema"))
        so = self.structured_outputs
        if so is not None:
            given = dict(json=so.json_, regex=so.regex, choice=so.choice, grammar=so.grammar,
                         json_object=so.json_object)  # fmt: skip
            kw = {k: v for k, v in given.items() if v is not None}
            if len(kw) != 1:
                raise APIError(400, "structured_outputs: give exactly one of json, regex, choice,"
                               " grammar, json_object", param="structured_outputs")  # fmt: skip
            key = next(iter(kw))
            kw["disable_any_whitespace"] = so.disable_any_whitespace
            found.append((kw, f"structured_outputs.{key}"))
        for name in ("json", "regex", "choice", "grammar"):
            value = getattr(self, f"guided_{name}")
            if value is not None:
                found.append(({name: value}, f"guided_{name}"))
        if len(found) > 1:
            raise APIError(400, f"{found[1][1]}: only one structured output per request (also "
                           f"given: {found[0][1]})", param=found[1][1])  # fmt: skip
        return found[0] if found else None

    def sampling_kwargs(self, max_tokens: int, logprobs: int | None) -> dict[str, Any]:
        """SamplingParams keyword arguments; unset fields keep the engine's defaults."""
        kw: dict[str, Any] = dict(
            n=self.n,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )
        if self.use_beam_search:  # as vLLM: greedy unless told otherwise (then refused)
            kw.update(use_beam_search=True, length_penalty=self.length_penalty, temperature=0.0)
        for name in (
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        ):
            value = getattr(self, name)
            if value is not None:
                kw[name] = value
        return kw

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | TokenIds | list[str] | list[TokenIds]
    max_tokens: int | None = Field(16, ge=0)  # 0: only with echo (score the prompt)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # vLLM's
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None

    def check_supported(self) -> None:
        _unsupported(self.suffix, "suffix")
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens: 0 needs echo: true (it scores the prompt only)",
                           param="max_tokens")  # fmt: skip
        if self.echo and self.use_beam_search:
            raise APIError(400, "echo is not supported with use_beam_search", param="echo")
        _unsupported(self.logit_bias, "logit_bias")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of must equal n (or be omitted)", param="best_of")

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: the engine generates one token, which is dropped."""
        return self.echo and self.max_tokens == 0

    @property
    def num_prompt_logprobs(self) -> int | None:
        """Top-N prompt logprobs the engine must compute (echo's logprobs, vLLM's field)."""
        wanted = [self.prompt_logprobs, self.logprobs if self.echo else None]
        return max((w for w in wanted if w is not None), default=None)

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: one string or token list each."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise APIError(400, "prompt: the list of prompts is empty", param="prompt")
        return list(p)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ToolCallFunction(_Request):
    name: str
    arguments: str  # JSON text


class MessageToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer: to which call

    def to_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: content flattened to one string, tool
        calls' arguments as objects (what Hugging Face templates render)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        msg: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name is not None:
            msg["name"] = self.name
        if self.tool_calls:
            msg["tool_calls"] = [
                {"id": c.id, "type": c.type,
                 "function": {"name": c.function.name, "arguments": _arguments(c.function)}}
                for c in self.tool_calls
            ]  # fmt: skip
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        return msg


def _arguments(f: ToolCallFunction) -> Any:
    try:
        return json.loads(f.arguments)
    except ValueError:
        raise APIError(400, f"messages: the arguments of tool call {f.name!r} are not JSON",
                       param="messages") from None  # fmt: skip


class FunctionDefinition(_Request):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    logit_bias: dict[str, float] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def check_supported(self) -> None:
        _unsupported(self.logit_bias, "logit_bias")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) < len(names):
            raise APIError(400, "tools: function names must be unique", param="tools")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise APIError(400, f"tool_choice: no function {choice.function.name!r} in tools",
                           param="tool_choice.function.name")  # fmt: skip

    @property
    def tool_mode(self) -> str:
        """ "none", "auto", "required" or "named" (no tools: "none"; tools: "auto" unless
        told otherwise)."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    def tool_functions(self) -> list[dict[str, Any]]:
        return [t.function.model_dump(exclude_none=True) for t in self.tools or []]

    @property
    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class EmbeddingRequest(_Request):
    """POST /v1/embeddings."""

    model: str | None = None
    input: str | TokenIds | Annotated[list[str], Field(min_length=1)] | list[TokenIds]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        p = self.input
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise APIError(400, "input: the list of inputs is empty", param="input")
        return list(p)


class EmbeddingData(BaseModel):
    object: str = "embedding"
    embedding: list[float] | str  # base64: little-endian float32 bytes
    index: int


class EmbeddingResponse(BaseModel):
    object: str = "list"
    data: list[EmbeddingData]
    model: str
    usage: UsageInfo


class TokenizeRequest(_Request):
    """POST /tokenize (vLLM's): a prompt, or messages rendered by the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True  # a prompt's (BOS, ...); the chat template writes its own
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None  # rendered by the chat template with the messages
    return_token_strs: bool = False

    def check_supported(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    """POST /detokenize (vLLM's)."""

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(BaseModel):
    prompt: str


def _unsupported(value: Any, name: str) -> None:
    if value:
        raise APIError(400, f"{name} is not supported by this server", param=name)


def parse_request(cls: type[_Request], body: bytes) -> Any:
    """Validate a raw JSON body into `cls`; every problem is a 400 APIError."""
    try:
        return cls.model_validate_json(body)
    except ValidationError as e:
        raise validation_error(e) from None


def input_error(e: InputError) -> APIError:
    """The engine's InputError (bad sampling value, prompt too long) as a 400 naming the
    field at fault."""
    code = "context_length_exceeded" if isinstance(e, ContextLengthError) else None
    return APIError(400, str(e), param=e.param, code=code)


def engine_error(e: Exception) -> APIError:
    """The engine failed the request (the model raised, the engine core died) as a 500."""
    return APIError(500, str(e), type="server_error", code="engine_error")


# ---- responses -------------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = None  # vLLM's


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[dict[str, Any]] = []  # [{id, type: "function", function: {name, arguments}}]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # fragments: {index, [id, type,] function}

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):  # a delta carries only what changed
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "kiln"
    max_model_len: int | None = None
    root: str | None = None  # a LoRA adapter's directory (vLLM's field)
    parent: str | None = None  # a LoRA adapter's base model


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
