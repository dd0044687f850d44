"""Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`): translated into a Chat
Completions request, served by the same engine, template rendering, tool-call parsing and reasoning split, and
written as Anthropic content blocks (whole) or Anthropic's event sequence (streamed). Errors on these routes are
in Anthropic's shape (errors.anthropic_route).
"""

from __future__ import annotations

import json
import uuid
from typing import Any, ClassVar, Literal

from pydantic import Field

from app.api.choices import Choice, usage_of
from app.api.errors import APIError, anthropic_error, engine_status
from app.api.protocol import (
    IGNORED_FIELDS,
    Bool,
    ChatCompletionRequest,
    Float,
    Int,
    RequestPart,
    StrictRequest,
    UsageInfo,
)
from app.api.serving import Shape, TextSplitter, chat_request, function_tool
from app.api.tools import OutputParsing
from app.engine.toolcalls import StreamEvent
from app.engine.types import Delta, EngineError, Finish


class ToolIn(RequestPart):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None  # "custom" or absent; Anthropic's server tools (bash_…, web_search_…) are refused


class ToolChoiceIn(RequestPart):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: Bool = False


class ThinkingIn(RequestPart):
    type: Literal["enabled", "disabled"]
    budget_tokens: Int | None = None


class MessageIn(RequestPart):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class OutputFormatIn(RequestPart):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(..., alias="schema")


class OutputConfigIn(RequestPart):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: OutputFormatIn | None = None


class CountTokensRequest(StrictRequest):
    # cache_control asks for prompt caching, which happens anyway (prefix reuse); the rest are routing hints.
    ignored_fields: ClassVar[frozenset[str]] = IGNORED_FIELDS | {"cache_control", "inference_geo", "speed"}

    model: str | None = None
    messages: list[MessageIn] = Field(..., min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[ToolIn] | None = None
    tool_choice: ToolChoiceIn | None = None
    thinking: ThinkingIn | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: Int = Field(..., ge=1)
    stop_sequences: list[str] | None = None
    temperature: Float = Field(1.0, ge=0.0, le=1.0)
    top_p: Float = Field(1.0, gt=0.0, le=1.0)
    top_k: Int = Field(0, ge=0)
    stream: Bool = False
    output_config: OutputConfigIn | None = None


# --- the request, as Chat Completions ---------------------------------------------------------------------

def _text_blocks(content: Any, where: str) -> str:
    """A string, or text blocks joined with a newline."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}: must be a string or a list of text blocks")
    texts = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind in ("image", "document", "search_result"):
            raise APIError(400, f"{where}.{j}: {kind} blocks are not supported: this server serves a text model")
        else:
            raise APIError(400, f"{where}.{j}: expected a text block, got {kind!r}")
    return "\n".join(texts)


def _user_messages(content: Any, where: str) -> list[dict[str, Any]]:
    """A user turn: tool results become tool messages (first, as clients put them), the text a user message."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    results: list[dict[str, Any]] = []
    texts: list[str] = []
    for j, block in enumerate(content):
        kind = block.get("type")
        if kind == "tool_result":
            call_id = block.get("tool_use_id")
            if not isinstance(call_id, str) or not call_id:
                raise APIError(400, f"{where}.{j}.tool_use_id must be a non-empty string")
            text = _text_blocks(block.get("content", ""), f"{where}.{j}.content")
            if block.get("is_error"):
                text = f"Error: {text}"
            results.append({"role": "tool", "tool_call_id": call_id, "content": text})
        else:
            texts.append(_text_blocks([block], where))
    return results + ([{"role": "user", "content": "\n".join(texts)}] if texts else [])


def _assistant_message(content: Any, where: str) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    thinking: list[str] = []
    for j, block in enumerate(content):
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "tool_use":
            name, call_id = block.get("name"), block.get("id")
            if not isinstance(name, str) or not isinstance(call_id, str):
                raise APIError(400, f"{where}.{j}: tool_use needs an id and a name")
            calls.append({"id": call_id, "type": "function",
                          "function": {"name": name, "arguments": json.dumps(block.get("input") or {})}})
        elif kind == "thinking":
            thinking.append(str(block.get("thinking", "")))
        elif kind == "redacted_thinking":
            continue
        else:
            raise APIError(400, f"{where}.{j}: assistant blocks of type {kind!r} are not supported")
    message: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts) if texts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    if thinking:
        message["reasoning_content"] = "\n".join(thinking)
    return message


def _chat_fields(body: CountTokensRequest) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    if body.system:
        messages.append({"role": "system", "content": _text_blocks(body.system, "system")})
    for i, message in enumerate(body.messages):
        where = f"messages.{i}.content"
        if message.role == "user":
            messages += _user_messages(message.content, where)
        else:
            messages.append(_assistant_message(message.content, where))
    fields: dict[str, Any] = {"messages": messages}
    if body.tools:
        tools = []
        for i, tool in enumerate(body.tools):
            if tool.type not in (None, "custom"):
                raise APIError(400, f"tools.{i}: server tools ({tool.type!r}) are not available on this server; "
                                    "only client tools with an input_schema")
            tools.append(function_tool(i, tool.name, tool.description, tool.input_schema))
        fields["tools"] = tools
    choice = body.tool_choice
    if choice is not None:
        if choice.type == "tool":
            if not choice.name:
                raise APIError(400, "tool_choice.name is required when tool_choice.type is 'tool'")
            fields["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            fields["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
        fields["parallel_tool_calls"] = not choice.disable_parallel_tool_use
    if body.thinking is not None:
        # Templates of hybrid reasoning models (Qwen3 and kin) switch thinking with this flag.
        fields["chat_template_kwargs"] = {"enable_thinking": body.thinking.type == "enabled"}
    return fields


def to_chat(body: MessagesRequest) -> ChatCompletionRequest:
    """The same request as Chat Completions (validated like one)."""
    fields = _chat_fields(body)
    fields.update(max_completion_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                  top_k=body.top_k, stop=body.stop_sequences or None, stream=body.stream)
    config = body.output_config
    if config is not None and config.format is not None:
        fields["response_format"] = {"type": "json_schema",
                                     "json_schema": {"name": "output", "schema": config.format.schema_}}
    if config is not None and config.effort is not None:
        # For templates that take an effort (gpt-oss); Anthropic's two extra levels are the template's highest.
        fields["reasoning_effort"] = {"xhigh": "high", "max": "high"}.get(config.effort, config.effort)
    return chat_request(fields)


def count_request(body: CountTokensRequest) -> ChatCompletionRequest:
    return chat_request(_chat_fields(body))


# --- the output -----------------------------------------------------------------------------------------------

def anthropic_usage(usage: UsageInfo) -> dict[str, Any]:
    """Anthropic counts cache reads apart from input_tokens (total input = the two together)."""
    cached = usage.prompt_tokens_details.cached_tokens
    return {"input_tokens": usage.prompt_tokens - cached, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached, "output_tokens": usage.completion_tokens}


def _arguments(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class MessagesShape(Shape):
    """One choice as Anthropic content blocks (thinking, text, tool_use in the order written), streamed as
    message_start, content_block_start/delta/stop …, message_delta, message_stop."""

    BLOCKS: ClassVar[dict[str, str]] = {"content": "text", "reasoning": "thinking"}

    def __init__(self, model: str, body: MessagesRequest, parsing: OutputParsing) -> None:
        super().__init__(model, want_logprobs=False, include_usage=True)
        self.ids.id = "msg_" + uuid.uuid4().hex
        self.stops = set(body.stop_sequences or [])
        self.splitter = TextSplitter(parsing)
        self._blocks = 0  # blocks started
        self._open: str | None = None  # the open block's type
        self._called = False
        self._finish: Finish | None = None

    def _stop(self, finish: Finish | None, called: bool) -> tuple[str | None, str | None]:
        """(stop_reason, stop_sequence)."""
        if finish is None:
            return None, None
        if finish.reason == "length":
            return "max_tokens", None
        if called:
            return "tool_use", None
        if finish.stop_sequence is not None and finish.stop_sequence in self.stops:
            return "stop_sequence", finish.stop_sequence
        return "end_turn", None

    def _message(self, content: list[dict[str, Any]], stop: tuple[str | None, str | None],
                 usage: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.ids.id, "type": "message", "role": "assistant", "model": self.ids.model,
                "content": content, "stop_reason": stop[0], "stop_sequence": stop[1], "usage": usage}

    def response(self, choices: list[Choice]) -> dict[str, Any]:
        choice = choices[0]
        parsed = self.splitter.whole(choice.text)
        content: list[dict[str, Any]] = []
        if parsed.reasoning:
            content.append({"type": "thinking", "thinking": parsed.reasoning, "signature": ""})
        if parsed.content or not parsed.tool_calls:
            content.append({"type": "text", "text": parsed.content})
        content += [{"type": "tool_use", "id": c.id, "name": c.name, "input": _arguments(c.arguments)}
                    for c in parsed.tool_calls]
        return self._message(content, self._stop(choice.finish, bool(parsed.tool_calls)),
                             anthropic_usage(usage_of(choices)))

    # the event sequence

    @staticmethod
    def _event(kind: str, **fields: Any) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields}, ensure_ascii=False)}\n\n"

    def opening(self, choice: Choice) -> str:
        self.splitter.open(choice.index)
        usage = {"input_tokens": len(choice.handle.request.prompt_tokens), "cache_creation_input_tokens": 0,
                 "cache_read_input_tokens": 0, "output_tokens": 0}
        return self._event("message_start", message=self._message([], (None, None), usage))

    def delta(self, choice: Choice, event: Delta) -> str:
        return "".join(self._on(ev) for ev in self.splitter.feed(choice.index, event.text))

    def closing(self, choice: Choice, finish: Finish) -> str:
        self._finish = finish
        out = "".join(self._on(ev) for ev in self.splitter.finish(choice.index))
        if self._blocks == 0:
            out += self._start_block({"type": "text", "text": ""})
        return out + self._stop_block()

    def usage_chunk(self, usage: UsageInfo) -> str:
        return ""

    def epilogue(self, choices: list[Choice]) -> str:
        reason, sequence = self._stop(self._finish, self._called)
        return (self._event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence},
                            usage=anthropic_usage(usage_of(choices)))
                + self._event("message_stop"))

    def error_event(self, error: EngineError) -> str:
        status, _ = engine_status(error)
        body = anthropic_error(status, str(error))
        return self._event("error", error=body["error"])

    def _on(self, ev: StreamEvent) -> str:
        if ev.kind in ("content", "reasoning"):
            kind = self.BLOCKS[ev.kind]
            out = ""
            if self._open != kind:
                out += self._stop_block()
                out += self._start_block({"type": "text", "text": ""} if kind == "text"
                                         else {"type": "thinking", "thinking": "", "signature": ""})
            delta = {"type": "text_delta", "text": ev.text} if kind == "text" \
                else {"type": "thinking_delta", "thinking": ev.text}
            return out + self._event("content_block_delta", index=self._blocks - 1, delta=delta)
        if ev.kind == "tool_call_start":
            self._called = True
            return self._stop_block() + self._start_block({"type": "tool_use", "id": ev.id, "name": ev.name,
                                                           "input": {}})
        return self._event("content_block_delta", index=self._blocks - 1,
                           delta={"type": "input_json_delta", "partial_json": ev.text})

    def _start_block(self, block: dict[str, Any]) -> str:
        self._open = block["type"]
        self._blocks += 1
        return self._event("content_block_start", index=self._blocks - 1, content_block=block)

    def _stop_block(self) -> str:
        if self._open is None:
            return ""
        self._open = None
        return self._event("content_block_stop", index=self._blocks - 1)
