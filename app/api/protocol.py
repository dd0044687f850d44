"""OpenAI request types (and llama.cpp's tokenize/detokenize), validated at the edge.

Unknown fields are ignored, as OpenAI-compatible servers do, so newer clients
keep working; known fields are checked against OpenAI's documented ranges.
Numbers are strict (no "5" or true for an integer), floats finite, and every
string must be encodable as UTF-8 (JSON lets a client send a lone surrogate).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    Strict,
    ValidationInfo,
    field_validator,
    model_serializer,
)

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


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _TopRequest(_Request):
    """A whole request body: refused (400 naming the field) if any string cannot be encoded."""

    @field_validator("*")
    @classmethod
    def _encodable(cls, value: Any, info: ValidationInfo) -> Any:
        where = find_unencodable(value)
        if where is not None:
            inner = f" (at {where})" if where else ""
            raise ValueError(f"text holds a lone UTF-16 surrogate, which is not valid Unicode{inner}")
        return value


class StreamOptions(_Request):
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


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: Bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None


class CompletionRequest(SamplingFields):
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


class ChatMessageOut(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatDelta(_Response):
    """A stream's increment: only what changed is sent (the final chunk's delta is `{}`)."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _only_given(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


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
