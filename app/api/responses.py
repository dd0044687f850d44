"""OpenAI's Responses API (`POST /v1/responses`), stateless: translated into a Chat Completions request, served by
the same engine, template rendering, tool-call parsing and reasoning split, and written as Responses output items
(whole) or the Responses event sequence (streamed).

What needs state kept on the server (`previous_response_id`, `store: true`, `conversation`, stored prompts,
background runs) and OpenAI's built-in tools are refused with a 400 that says so.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, ClassVar, Literal

from pydantic import Field

from app.api.choices import Choice, usage_of
from app.api.errors import APIError
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
from app.api.serving import Shape, TextSplitter, chat_request, finish_reason, function_tool
from app.api.tools import OutputParsing
from app.engine.toolcalls import StreamEvent
from app.engine.types import Delta, EngineError, Finish

STATEFUL = "this server keeps no responses (stateless): send the whole conversation in `input`"


class TextFormat(RequestPart):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: Bool | None = None


class TextOptions(RequestPart):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningOptions(RequestPart):
    effort: Literal["minimal", "low", "medium", "high"] | None = None
    summary: str | None = None


class FunctionTool(RequestPart):
    """A Responses function tool: flat, not nested under `function` as in Chat Completions."""

    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: Bool | None = None


class NamedFunctionChoice(RequestPart):
    type: str
    name: str | None = None


class ResponsesRequest(StrictRequest):
    # Clients send these out of habit; they change nothing on a stateless server.
    ignored_fields: ClassVar[frozenset[str]] = IGNORED_FIELDS | {"prompt_cache_key", "safety_identifier",
                                                                 "stream_options"}

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: Int | None = Field(None, ge=1)
    temperature: Float = Field(1.0, ge=0.0, le=2.0)
    top_p: Float = Field(1.0, gt=0.0, le=1.0)
    seed: Int | None = None  # an extension, as in Chat Completions: reproducible sampling
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: Bool = True
    text: TextOptions | None = None
    reasoning: ReasoningOptions | None = None
    stream: Bool = False
    store: Bool = False
    previous_response_id: str | None = None
    conversation: Any = None
    background: Bool = False
    prompt: Any = None
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    max_tool_calls: Int | None = Field(None, ge=1)


# --- the request, as Chat Completions ---------------------------------------------------------------------

def refuse_state(body: ResponsesRequest) -> None:
    """A 400 for what would need the server to remember something, or run something of OpenAI's."""
    if body.previous_response_id:
        raise APIError(400, f"previous_response_id: {STATEFUL}", param="previous_response_id")
    if body.store:
        raise APIError(400, f"store: true is not supported; {STATEFUL}", param="store")
    if body.conversation is not None:
        raise APIError(400, f"conversation: {STATEFUL}", param="conversation")
    if body.prompt is not None:
        raise APIError(400, "prompt: stored prompt templates are not supported; send `instructions` and `input`",
                       param="prompt")
    if body.background:
        raise APIError(400, f"background: true is not supported; {STATEFUL}", param="background")
    if body.max_tool_calls is not None:
        raise APIError(400, "max_tool_calls is not supported by this server", param="max_tool_calls")
    for i, tool in enumerate(body.tools or []):
        if tool.type != "function":
            raise APIError(400, f"tools.{i}: built-in tools ({tool.type!r}) are not available on this server; "
                                "only function tools", param=f"tools.{i}.type")
    if body.include:
        raise APIError(400, f"include: {body.include[0]!r} is not available on this server", param="include")


def _text_of(content: Any, where: str) -> str:
    """A message's content: a string, or text parts joined with a newline."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}: content must be a string or a list of content parts", param=where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("input_image", "input_file", "input_audio"):
            raise APIError(400, f"{where}.{j}: {kind} is not supported: this server serves a text model",
                           param=f"{where}.{j}")
        elif kind == "refusal":
            texts.append(str(part.get("refusal", "")))
        else:
            raise APIError(400, f"{where}.{j}: unknown content part type {kind!r}", param=f"{where}.{j}")
    return "\n".join(texts)


def _string_field(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise APIError(400, f"{where}.{key} must be a non-empty string", param=f"{where}.{key}")
    return value


def input_messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """`instructions` and `input` as Chat Completions messages: consecutive function calls become one assistant
    message with tool_calls, their outputs tool messages, a reasoning item the next assistant message's
    reasoning_content."""
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        messages.append({"role": "user", "content": body.input})
        return messages
    if not body.input:
        raise APIError(400, "input must not be empty", param="input")
    reasoning: str | None = None
    for i, item in enumerate(body.input):
        where = f"input.{i}"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise APIError(400, f"{where}.role must be user, assistant, system or developer",
                               param=f"{where}.role")
            message: dict[str, Any] = {"role": role, "content": _text_of(item.get("content"), f"{where}.content")}
            if role == "assistant" and reasoning is not None:
                message["reasoning_content"], reasoning = reasoning, None
            messages.append(message)
        elif kind == "function_call":
            call = {"id": _string_field(item, "call_id", where), "type": "function",
                    "function": {"name": _string_field(item, "name", where),
                                 "arguments": item.get("arguments") or "{}"}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                if reasoning is not None:
                    messages[-1]["reasoning_content"], reasoning = reasoning, None
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _text_of(output, f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": _string_field(item, "call_id", where),
                             "content": text})
        elif kind == "reasoning":
            parts = [p.get("text", "") for p in item.get("content") or [] if isinstance(p, dict)]
            reasoning = "\n".join(str(p) for p in parts) or None
        elif kind == "item_reference":
            raise APIError(400, f"{where}: item references need stored items; {STATEFUL}", param=where)
        else:
            raise APIError(400, f"{where}: input items of type {kind!r} are not supported", param=f"{where}.type")
    return messages


def _chat_tools(body: ResponsesRequest) -> list[dict[str, Any]] | None:
    if not body.tools:
        return None
    return [function_tool(i, tool.name or "", tool.description, tool.parameters, tool.strict)
            for i, tool in enumerate(body.tools)]


def _chat_tool_choice(body: ResponsesRequest) -> Any:
    choice = body.tool_choice
    if choice is None or isinstance(choice, str):
        return choice
    if choice.type != "function" or not choice.name:
        raise APIError(400, "tool_choice: only 'none', 'auto', 'required' or {\"type\": \"function\", \"name\": ...} "
                            "are supported", param="tool_choice")
    return {"type": "function", "function": {"name": choice.name}}


def _response_format(body: ResponsesRequest) -> dict[str, Any] | None:
    fmt = body.text.format if body.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.schema_ is None:
        raise APIError(400, "text.format.schema is required for json_schema", param="text.format.schema")
    return {"type": "json_schema", "json_schema": {"name": fmt.name or "response", "schema": fmt.schema_,
                                                   "strict": fmt.strict}}


def to_chat(body: ResponsesRequest) -> ChatCompletionRequest:
    """The same request as Chat Completions (validated like one)."""
    refuse_state(body)
    fields: dict[str, Any] = {
        "messages": input_messages(body), "temperature": body.temperature, "top_p": body.top_p,
        "seed": body.seed, "max_completion_tokens": body.max_output_tokens, "tools": _chat_tools(body),
        "tool_choice": _chat_tool_choice(body), "parallel_tool_calls": body.parallel_tool_calls,
        "response_format": _response_format(body), "stream": body.stream,
    }
    if body.reasoning is not None and body.reasoning.effort is not None:
        fields["reasoning_effort"] = body.reasoning.effort
    return chat_request({k: v for k, v in fields.items() if v is not None}, within="input")


# --- the output -----------------------------------------------------------------------------------------------

def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def responses_usage(usage: UsageInfo) -> dict[str, Any]:
    return {"input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": usage.prompt_tokens_details.cached_tokens},
            "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens}


def _message_item(text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": _id("msg"), "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _reasoning_item(text: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": _id("rs"), "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def _call_item(call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": _id("fc"), "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


class ResponsesShape(Shape):
    """One choice as Responses output items: a reasoning item, a message, function calls, in the order the model
    wrote them; streamed as `response.created` … `response.completed` (or `.incomplete` at max_output_tokens)."""

    id_prefix = "resp"
    OUTER_ITEM: ClassVar[dict[str, str]] = {"content": "message", "reasoning": "reasoning"}

    def __init__(self, model: str, body: ResponsesRequest, parsing: OutputParsing) -> None:
        super().__init__(model, want_logprobs=False, include_usage=True)
        self.ids.id = self.ids.id.replace("resp-", "resp_")
        self.body = body
        self.splitter = TextSplitter(parsing)
        self._seq = 0
        self._items: list[dict[str, Any]] = []  # finished output items
        self._open: dict[str, Any] | None = None  # the item being streamed
        self._finish: Finish | None = None

    # the response object

    def _object(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None,
                finish: Finish | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        incomplete = {"reason": "max_output_tokens"} if finish is not None and finish.reason == "length" else None
        body = self.body
        fmt = body.text.format.model_dump(by_alias=True, exclude_none=True) \
            if body.text is not None and body.text.format is not None else {"type": "text"}
        return {
            "id": self.ids.id, "object": "response", "created_at": self.ids.created, "status": status,
            "model": self.ids.model, "output": output, "usage": usage, "error": error,
            "incomplete_details": incomplete, "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens, "temperature": body.temperature, "top_p": body.top_p,
            "parallel_tool_calls": body.parallel_tool_calls,
            "tool_choice": body.tool_choice.model_dump(exclude_none=True)
            if isinstance(body.tool_choice, RequestPart) else (body.tool_choice or "auto"),
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
            "text": {"format": fmt}, "reasoning": {"effort": body.reasoning.effort if body.reasoning else None,
                                                   "summary": None},
            "store": False, "background": False, "previous_response_id": None, "truncation": "disabled",
            "metadata": {}, "user": None,
        }

    @staticmethod
    def _status(finish: Finish | None) -> str:
        return "incomplete" if finish is not None and finish.reason == "length" else "completed"

    def response(self, choices: list[Choice]) -> dict[str, Any]:
        choice = choices[0]
        parsed = self.splitter.whole(choice.text)
        output: list[dict[str, Any]] = []
        if parsed.reasoning:
            output.append(_reasoning_item(parsed.reasoning))
        if parsed.content or not parsed.tool_calls:
            status = "incomplete" if finish_reason(choice.finish) == "length" else "completed"
            output.append(_message_item(parsed.content, status))
        output += [_call_item(c.id, c.name, c.arguments) for c in parsed.tool_calls]
        return self._object(self._status(choice.finish), output, responses_usage(usage_of(choices)), choice.finish)

    # the event sequence

    def _event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    def preamble(self) -> str:
        created = self._object("in_progress", [], None)
        return (self._event("response.created", response=created)
                + self._event("response.in_progress", response=created))

    def opening(self, choice: Choice) -> str | None:
        self.splitter.open(choice.index)
        return None

    def delta(self, choice: Choice, event: Delta) -> str:
        return "".join(self._on(ev) for ev in self.splitter.feed(choice.index, event.text))

    def closing(self, choice: Choice, finish: Finish) -> str:
        self._finish = finish
        out = "".join(self._on(ev) for ev in self.splitter.finish(choice.index))
        if not self._items and self._open is None:
            out += self._open_item("message")  # nothing said: an empty message, as the whole response has
        return out + self._close_item()

    def usage_chunk(self, usage: UsageInfo) -> str:
        return ""

    def epilogue(self, choices: list[Choice]) -> str:
        status = self._status(self._finish)
        final = self._object(status, self._items, responses_usage(usage_of(choices)), self._finish)
        return self._event("response.completed" if status == "completed" else "response.incomplete",
                           response=final)

    def error_event(self, error: EngineError) -> str:
        out = self._event("error", code=error.code, message=str(error), param=error.param)
        failed = self._object("failed", self._items, None,
                              error={"code": error.code or "server_error", "message": str(error)})
        return out + self._event("response.failed", response=failed)

    def _on(self, ev: StreamEvent) -> str:
        out = ""
        if ev.kind in ("content", "reasoning"):
            kind = self.OUTER_ITEM[ev.kind]
            if self._open is None or self._open["type"] != kind:
                out += self._close_item() + self._open_item(kind)
            assert self._open is not None
            self._open["content"][0]["text"] += ev.text
            where = {"item_id": self._open["id"], "output_index": len(self._items), "content_index": 0}
            if kind == "message":
                return out + self._event("response.output_text.delta", **where, delta=ev.text, logprobs=[])
            return out + self._event("response.reasoning_text.delta", **where, delta=ev.text)
        if ev.kind == "tool_call_start":
            out += self._close_item()
            self._open = _call_item(ev.id, ev.name, "", status="in_progress")
            return out + self._event("response.output_item.added", output_index=len(self._items), item=self._open)
        assert self._open is not None and self._open["type"] == "function_call"
        self._open["arguments"] += ev.text
        return self._event("response.function_call_arguments.delta", item_id=self._open["id"],
                           output_index=len(self._items), delta=ev.text)

    def _open_item(self, kind: str) -> str:
        self._open = _message_item("", "in_progress") if kind == "message" \
            else {**_reasoning_item(""), "status": "in_progress"}
        part = dict(self._open["content"][0])
        index = len(self._items)
        out = self._event("response.output_item.added", output_index=index,
                          item={**self._open, "content": []})
        return out + self._event("response.content_part.added", item_id=self._open["id"], output_index=index,
                                 content_index=0, part=part)

    def _close_item(self) -> str:
        item, self._open = self._open, None
        if item is None:
            return ""
        index = len(self._items)
        out = ""
        if item["type"] == "function_call":
            out += self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                               name=item["name"], arguments=item["arguments"])
        else:
            part = item["content"][0]
            done = "response.output_text.done" if item["type"] == "message" else "response.reasoning_text.done"
            extra: dict[str, Any] = {"logprobs": []} if item["type"] == "message" else {}
            out += self._event(done, item_id=item["id"], output_index=index, content_index=0, text=part["text"],
                               **extra)
            out += self._event("response.content_part.done", item_id=item["id"], output_index=index,
                               content_index=0, part=part)
        if item["type"] == "reasoning":
            item.pop("status", None)
        elif item["type"] == "message" and self._finish is not None and self._finish.reason == "length":
            item["status"] = "incomplete"
        else:
            item["status"] = "completed"
        self._items.append(item)
        return out + self._event("response.output_item.done", output_index=index, item=item)
