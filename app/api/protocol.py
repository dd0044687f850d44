"""OpenAI request types (and llama.cpp's tokenize/detokenize), validated at the edge.

Unknown fields are ignored, as OpenAI-compatible servers do, so newer clients
keep working; known fields are checked against OpenAI's documented ranges.
Numbers are strict (no "5" or true for an integer), floats finite, and every
string must be encodable as UTF-8 (JSON lets a client send a lone surrogate).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    Strict,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

MAX_N = 16
MAX_STOP = 4

# Strict scalars: JSON's types are what the client meant, not strings or booleans coerced.
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Float = Annotated[float, Field(allow_inf_nan=False), Strict()]

_SURROGATE = re.compile("[\ud800-\udfff]")


def find_unencodable(value: Any, path: str = "") -> str | None:
    """The path of the first string (key or value) holding a lone surrogate, or None."""
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    if isinstance(value, BaseModel):
        value = {k: getattr(value, k) for k in type(value).model_fields}
    if isinstance(value, dict):
        for key, inner in value.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and _SURROGATE.search(key):
                return where
            found = find_unencodable(inner, where)
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, inner in enumerate(value):
            found = find_unencodable(inner, f"{path}.{i}" if path else str(i))
            if found:
                return found
    return None


class RequestPart(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _TopRequest(RequestPart):
    """A whole request body: refused (400 naming the field) if any string cannot be encoded."""

    @field_validator("*")
    @classmethod
    def _encodable(cls, value: Any, info: ValidationInfo) -> Any:
        where = find_unencodable(value)
        if where is not None:
            inner = f" (at {where})" if where else ""
            raise ValueError(f"text holds a lone UTF-16 surrogate, which is not valid Unicode{inner}")
        return value


class StreamOptions(RequestPart):
    include_usage: Bool = False


def _check_stop(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else list(value)
    if len(stops) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
    return [s for s in stops if s]


class SamplingFields(_TopRequest):
    model: str | None = None
    max_tokens: Int | None = Field(None, ge=1)
    temperature: Float = Field(1.0, ge=0.0, le=2.0)
    top_p: Float = Field(1.0, gt=0.0, le=1.0)
    top_k: Int = Field(0, ge=0)
    min_p: Float = Field(0.0, ge=0.0, le=1.0)
    presence_penalty: Float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: Float = Field(0.0, ge=-2.0, le=2.0)
    repeat_penalty: Float = Field(1.0, gt=0.0, le=10.0)
    seed: Int | None = None
    stop: str | list[str] | None = None
    n: Int = Field(1, ge=1, le=MAX_N)
    stream: Bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: Bool = False  # llama.cpp extension, for fixed-length benchmarks

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        return _check_stop(value)


# Fields clients send out of habit that change nothing here: accepted and ignored. Any other field this server
# does not implement is refused with a 400 naming it, never silently dropped.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier"})


class StrictRequest(_TopRequest):
    """A request body whose unknown fields are refused (except the surface's `ignored_fields`)."""

    model_config = ConfigDict(extra="allow")
    ignored_fields: ClassVar[frozenset[str]] = IGNORED_FIELDS

    @model_validator(mode="after")
    def _known_fields_only(self) -> StrictRequest:
        unknown = sorted(k for k in (self.model_extra or {}) if k not in self.ignored_fields)
        if unknown:
            raise PydanticCustomError("unsupported_field", "{field}: this server does not support this field",
                                      {"field": unknown[0]})
        return self


class FunctionCall(RequestPart):
    name: str
    arguments: str = "{}"


class ToolCallIn(RequestPart):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(RequestPart):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDef(RequestPart):
    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: Bool | None = None


class ToolDef(RequestPart):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(RequestPart):
    name: str


class NamedToolChoice(RequestPart):
    type: Literal["function"]
    function: NamedFunction


MAX_TOOLS = 128


class ChatCompletionRequest(SamplingFields, StrictRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: Bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[ToolDef] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: Bool = True
    logit_bias: dict[str, Float] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"keys are token ids (got {key[:40]!r})")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases are between -100 and 100 (got {bias} for token {key})")
        return value


class CompletionRequest(SamplingFields, StrictRequest):
    prompt: str | list[str] | list[Int] | list[list[Int]]
    echo: Bool = False
    logprobs: Int | None = Field(None, ge=0, le=5)
    suffix: str | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        return value


class EmbeddingRequest(_TopRequest):
    model: str | None = None
    input: str | list[str] | list[Int] | list[list[Int]]
    encoding_format: Literal["float", "base64"] = "float"

    @field_validator("input")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("input must not be an empty list")
        return value


class TokenizeRequest(_TopRequest):
    content: str
    add_special: Bool = False
    parse_special: Bool = True
    with_pieces: Bool = False


class DetokenizeRequest(_TopRequest):
    tokens: list[Int]


# --- responses: the wire format, typed -------------------------------------------------------------------------

class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class UsageInfo(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class TopLogprobEntry(_Response):
    token: str
    logprob: float
    bytes: list[int]


class LogprobEntry(TopLogprobEntry):
    top_logprobs: list[TopLogprobEntry]


class ChatLogprobs(_Response):
    content: list[LogprobEntry]
    refusal: str | None = None


class FunctionCallOut(_Response):
    name: str
    arguments: str


class ToolCallOut(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class _Sparse(_Response):
    """A stream increment: fields left as None are not sent at all."""

    @model_serializer(mode="wrap")
    def _only_given(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class FunctionCallDelta(_Sparse):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Sparse):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatMessageOut(_Response):
    """The assistant's message; `reasoning_content` and `tool_calls` appear only when there are some."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None

    @model_serializer(mode="wrap")
    def _optional_parts(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        for key in ("reasoning_content", "tool_calls"):
            if out.get(key) is None:
                out.pop(key, None)
        return out


class ChatDelta(_Sparse):
    """A stream's increment: only what changed is sent (the final chunk's delta is `{}`)."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChoice(_Response):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class _Completionish(_Response):
    id: str
    created: int
    model: str
    system_fingerprint: str | None = None
    usage: UsageInfo | None = None


class ChatCompletionResponse(_Completionish):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ChatCompletionChunk(_Completionish):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class CompletionResponse(_Completionish):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class CompletionChunk(CompletionResponse):
    """Text completion streams use the same object name for their chunks."""


class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorDetail


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "llamacpp-clearml"


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]
