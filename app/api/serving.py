"""The logic behind /v1/chat/completions and /v1/completions: build engine requests, shape replies.

Routing lives in routes.py and the choices' bookkeeping in choices.py; this module turns validated requests
into `ChoiceSpec`s and writes the engine's events in OpenAI's wire format, whole or streamed. Chat and text
completions differ only in their `Shape` (how a choice, a delta and a finish look); one streamer serves both.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from app.api.choices import Choice, ChoiceSet, ChoiceSpec, usage_of
from app.api.errors import APIError, error_response_body
from app.api.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    FunctionCallDelta,
    FunctionCallOut,
    FunctionDef,
    LogprobEntry,
    SamplingFields,
    ToolCallDelta,
    ToolCallOut,
    TopLogprobEntry,
    UsageInfo,
)
from app.api.tools import OutputParsing, ToolPlan, forced_grammar, plan_tools
from app.engine.sampling import grammar_for_response_format
from app.engine.toolcalls import ParsedOutput, StreamEvent, StreamParser, parse_output
from app.engine.types import (
    ChatPrompt,
    Delta,
    EngineError,
    EngineProtocol,
    Finish,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
)

log = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"


@dataclass
class ResponseIds:
    """What every chunk of one response repeats."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, model: str) -> ResponseIds:
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model)


# --- building engine requests ------------------------------------------------------------------------------

def sampling_of(body: SamplingFields, seed_offset: int, grammar: str | None) -> SamplingParams:
    seed = None if body.seed is None else body.seed + seed_offset
    return SamplingParams(
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        repeat_penalty=body.repeat_penalty, seed=seed, grammar=grammar,
    )


def resolve_max_tokens(requested: int | None, n_prompt: int, n_ctx_seq: int) -> int:
    """OpenAI semantics: no max_tokens means 'until the context is full'."""
    if requested is not None:
        return requested
    room = n_ctx_seq - n_prompt
    if room < 1:
        raise APIError(400, f"The prompt has {n_prompt} tokens; this server's context is {n_ctx_seq}.",
                       code="context_length_exceeded", param="messages")
    return room


async def response_format_grammar(response_format: dict[str, Any] | None) -> str | None:
    """The grammar for a response_format, converted in a worker thread; free text costs no thread hop."""
    if not response_format or response_format.get("type") in (None, "text"):
        return None
    return await asyncio.to_thread(grammar_for_response_format, response_format)


def chat_request(fields: dict[str, Any], within: str | None = None) -> ChatCompletionRequest:
    """Another surface's request translated into Chat Completions fields, validated as a chat request; a field
    that fails is a 400 naming where in the chat request (under `within`, the surface's own field, if given)."""
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        message = f"{where}: {first.get('msg')}"
        raise APIError(400, f"{within}: {message}" if within else message, param=within) from None


def function_tool(index: int, name: str, description: str | None, parameters: dict[str, Any] | None,
                  strict: bool | None = None) -> dict[str, Any]:
    """Another surface's function tool as a Chat Completions tool; a bad name is a 400 naming `tools.N.name`."""
    try:
        fn = FunctionDef(name=name, description=description, parameters=parameters, strict=strict)
    except ValidationError as exc:
        raise APIError(400, f"tools.{index}.name: {exc.errors()[0]['msg']}", param=f"tools.{index}.name") from None
    return {"type": "function", "function": fn.model_dump(exclude_none=True)}


def check_token_ids(engine: EngineProtocol, tokens: list[int], param: str) -> list[int]:
    """Token ids from a client, refused (400) if empty or outside the vocabulary, never handed to llama.cpp."""
    if not tokens:
        raise APIError(400, f"{param}: a token list must not be empty", param=param)
    bad = [t for t in tokens if not engine.valid_token(t)]
    if bad:
        raise APIError(400, f"{param}: token ids outside the vocabulary: {bad[:5]}", param=param)
    return [int(t) for t in tokens]


async def render_chat(engine: EngineProtocol, body: ChatCompletionRequest) -> tuple[ToolPlan, ChatPrompt]:
    """The tool plan and the prompt as the model's template renders it (messages, tools, template kwargs)."""
    plan = plan_tools(engine.output_format, body)
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    kwargs = dict(body.chat_template_kwargs or {})
    if body.reasoning_effort is not None:
        kwargs.setdefault("reasoning_effort", body.reasoning_effort)
    prompt = await asyncio.to_thread(engine.chat_prompt, messages, plan.tools, kwargs)
    return plan, prompt


async def build_chat(engine: EngineProtocol, body: ChatCompletionRequest) -> tuple[list[ChoiceSpec], OutputParsing]:
    plan, prompt = await render_chat(engine, body)
    if plan.forced is not None:
        grammar = await asyncio.to_thread(forced_grammar, plan, body.parallel_tool_calls, prompt.opens_reasoning)
    else:
        grammar = await response_format_grammar(body.response_format)
    bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = resolve_max_tokens(requested, len(prompt.tokens), engine.n_ctx_seq)
    top = None
    if body.logprobs:
        top = body.top_logprobs or 0
    elif body.top_logprobs is not None:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    stop = list(body.stop or []) + [s for s in prompt.stop if s not in (body.stop or [])]
    specs = []
    for i in range(body.n):
        sampling = sampling_of(body, i, grammar)
        sampling.logit_bias = bias
        request = GenerationRequest(prompt.tokens, max_tokens, sampling, stop, top, body.ignore_eos,
                                    render_special=plan.parsing.active)
        specs.append(ChoiceSpec(0, request))
    return specs, dataclasses.replace(plan.parsing, opens_reasoning=prompt.opens_reasoning)


async def build_completion(engine: EngineProtocol, body: CompletionRequest) -> list[ChoiceSpec]:
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo together with logprobs is not supported (prompt log-probabilities are not kept)",
                       param="echo")
    if body.suffix:
        raise APIError(400, "suffix (insertion) is not supported by this server", param="suffix")
    raw = body.prompt
    prompts: list[str | list[int]]
    if isinstance(raw, str):
        prompts = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        prompts = [raw]  # type: ignore[list-item]  # one prompt given as token ids
    else:
        prompts = list(raw)  # type: ignore[arg-type]
    grammar = await response_format_grammar(body.response_format)
    out: list[ChoiceSpec] = []
    for p_index, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            tokens = await asyncio.to_thread(engine.tokenize, prompt, True, False)
            text = prompt
        else:
            tokens = check_token_ids(engine, prompt, "prompt")
            text = await asyncio.to_thread(engine.detokenize, tokens)
        max_tokens = resolve_max_tokens(body.max_tokens if body.max_tokens is not None else 16,
                                        len(tokens), engine.n_ctx_seq)
        for i in range(body.n):
            req = GenerationRequest(tokens, max_tokens, sampling_of(body, i, grammar), list(body.stop or []),
                                    body.logprobs, body.ignore_eos)
            out.append(ChoiceSpec(p_index, req, text if body.echo else ""))
    return out


# --- the two shapes ------------------------------------------------------------------------------------------

def finish_reason(finish: Finish | None) -> str | None:
    if finish is None:
        return None
    return "length" if finish.reason == "length" else "stop"


def chat_logprobs(entries: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(content=[
        LogprobEntry(token=e.token, logprob=e.logprob, bytes=e.bytes,
                     top_logprobs=[TopLogprobEntry(token=t.token, logprob=t.logprob, bytes=t.bytes) for t in e.top])
        for e in entries
    ])


def completion_logprobs(entries: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    tokens, lps, tops, offsets = [], [], [], []
    pos = offset
    for e in entries:
        tokens.append(e.token)
        lps.append(e.logprob)
        tops.append({t.token: t.logprob for t in e.top})
        offsets.append(pos)
        pos += len(e.token)
    return CompletionLogprobs(tokens=tokens, token_logprobs=lps, top_logprobs=tops, text_offset=offsets)


class Shape(abc.ABC):
    """How one endpoint writes its choices, whole or as SSE events; `stream` does the rest.

    OpenAI's Chat and text completions end a stream with an optional usage chunk and `[DONE]`; the Responses
    and Anthropic Messages surfaces override `preamble`, `epilogue` and `error_event` with their own events.
    """

    id_prefix = ""

    def __init__(self, model: str, want_logprobs: bool, include_usage: bool) -> None:
        self.ids = ResponseIds.new(self.id_prefix, model)
        self.want_logprobs = want_logprobs
        self.include_usage = include_usage

    def preamble(self) -> str | None:
        """What a stream sends before any choice opens."""
        return None

    @abc.abstractmethod
    def opening(self, choice: Choice) -> str | None: ...
    @abc.abstractmethod
    def delta(self, choice: Choice, event: Delta) -> str: ...
    @abc.abstractmethod
    def closing(self, choice: Choice, finish: Finish) -> str: ...
    @abc.abstractmethod
    def usage_chunk(self, usage: UsageInfo) -> str: ...
    @abc.abstractmethod
    def response(self, choices: list[Choice]) -> Any: ...

    def epilogue(self, choices: list[Choice]) -> str:
        """What a stream sends after every choice finished."""
        head = self.usage_chunk(usage_of(choices)) if self.include_usage else ""
        return head + SSE_DONE

    def error_event(self, error: EngineError) -> str:
        """A stream the server ends early: never a silent cut."""
        return stream_error(error)


class TextSplitter:
    """Splits each choice's text into content, reasoning and tool calls as `parsing` says, streamed (a
    StreamParser per choice) or whole (parse_output): the same result either way. Without parsing, all is
    content."""

    def __init__(self, parsing: OutputParsing | None) -> None:
        self.parsing = parsing if parsing is not None and parsing.active else None
        self._parsers: dict[int, StreamParser] = {}

    def open(self, index: int) -> None:
        if self.parsing is not None:
            self._parsers[index] = StreamParser(self.parsing.format(), reasoning=self.parsing.reasoning,
                                                prompt_opens_reasoning=self.parsing.opens_reasoning)

    def feed(self, index: int, text: str) -> list[StreamEvent]:
        parser = self._parsers.get(index)
        if parser is None:
            return [StreamEvent("content", text)] if text else []
        return parser.feed(text)

    def finish(self, index: int) -> list[StreamEvent]:
        parser = self._parsers.get(index)
        return parser.finish() if parser is not None else []

    def whole(self, text: str) -> ParsedOutput:
        if self.parsing is None:
            return ParsedOutput(text, None, [])
        return parse_output(self.parsing.format(), text, reasoning=self.parsing.reasoning,
                            prompt_opens_reasoning=self.parsing.opens_reasoning)


class ChatShape(Shape):
    """Chat completions; with `parsing` active, each choice's text is split into content, reasoning_content and
    tool_calls (see TextSplitter)."""

    id_prefix = "chatcmpl"

    def __init__(self, model: str, want_logprobs: bool, include_usage: bool,
                 parsing: OutputParsing | None = None) -> None:
        super().__init__(model, want_logprobs, include_usage)
        self.splitter = TextSplitter(parsing)
        self._called: set[int] = set()  # choices that started a tool call

    def _chunk(self, choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> str:
        chunk = ChatCompletionChunk(id=self.ids.id, created=self.ids.created, model=self.ids.model,
                                    choices=choices, usage=usage)
        return sse(chunk.model_dump_json(exclude=None if self.include_usage else {"usage"}))

    def opening(self, choice: Choice) -> str | None:
        self.splitter.open(choice.index)
        return self._chunk([ChatChunkChoice(index=choice.index, delta=ChatDelta(role="assistant", content=""))])

    def delta(self, choice: Choice, event: Delta) -> str:
        lp = chat_logprobs(event.logprobs) if self.want_logprobs else None
        if self.splitter.parsing is None:
            return self._chunk([ChatChunkChoice(index=choice.index, delta=ChatDelta(content=event.text),
                                                logprobs=lp)])
        return self._events(choice.index, self.splitter.feed(choice.index, event.text), lp)

    def closing(self, choice: Choice, finish: Finish) -> str:
        head = self._events(choice.index, self.splitter.finish(choice.index), None)
        reason = finish_reason(finish)
        if choice.index in self._called and reason == "stop":
            reason = "tool_calls"
        return head + self._chunk([ChatChunkChoice(index=choice.index, delta=ChatDelta(), finish_reason=reason)])

    def _events(self, index: int, events: list[StreamEvent], logprobs: ChatLogprobs | None) -> str:
        """One chunk per parser event (content, reasoning, a call's start, an arguments fragment)."""
        out = []
        for ev in events:
            if ev.kind == "content":
                delta = ChatDelta(content=ev.text)
            elif ev.kind == "reasoning":
                delta = ChatDelta(reasoning_content=ev.text)
            elif ev.kind == "tool_call_start":
                self._called.add(index)
                delta = ChatDelta(tool_calls=[ToolCallDelta(index=ev.index, id=ev.id, type="function",
                                                            function=FunctionCallDelta(name=ev.name, arguments=""))])
            else:
                delta = ChatDelta(tool_calls=[ToolCallDelta(index=ev.index,
                                                            function=FunctionCallDelta(arguments=ev.text))])
            out.append(self._chunk([ChatChunkChoice(index=index, delta=delta, logprobs=logprobs)]))
            logprobs = None  # the token's log-probabilities go with its first chunk
        return "".join(out)

    def _message(self, choice: Choice) -> tuple[ChatMessageOut, str | None]:
        reason = finish_reason(choice.finish)
        if self.splitter.parsing is None:
            return ChatMessageOut(content=choice.text), reason
        parsed = self.splitter.whole(choice.text)
        calls = [ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
                 for c in parsed.tool_calls]
        if calls and reason == "stop":
            reason = "tool_calls"
        content = parsed.content if parsed.content or not calls else None
        return ChatMessageOut(content=content, reasoning_content=parsed.reasoning, tool_calls=calls or None), reason

    def usage_chunk(self, usage: UsageInfo) -> str:
        return self._chunk([], usage)

    def response(self, choices: list[Choice]) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=self.ids.id, created=self.ids.created, model=self.ids.model, usage=usage_of(choices),
            choices=[ChatChoice(index=c.index, message=message,
                                logprobs=chat_logprobs(c.logprobs) if self.want_logprobs else None,
                                finish_reason=reason)
                     for c in choices for message, reason in [self._message(c)]])


class CompletionShape(Shape):
    id_prefix = "cmpl"

    def __init__(self, model: str, want_logprobs: bool, include_usage: bool) -> None:
        super().__init__(model, want_logprobs, include_usage)
        self._offsets: dict[int, int] = {}  # per choice: where the next text starts (for text_offset)

    def _chunk(self, choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
        chunk = CompletionChunk(id=self.ids.id, created=self.ids.created, model=self.ids.model, choices=choices,
                                usage=usage)
        return sse(chunk.model_dump_json(exclude=None if self.include_usage else {"usage"}))

    def opening(self, choice: Choice) -> str | None:
        self._offsets[choice.index] = len(choice.prefix)
        return self._chunk([CompletionChoice(index=choice.index, text=choice.prefix)]) if choice.prefix else None

    def delta(self, choice: Choice, event: Delta) -> str:
        offset = self._offsets.get(choice.index, 0)
        lp = completion_logprobs(event.logprobs, offset) if self.want_logprobs else None
        self._offsets[choice.index] = offset + len(event.text)
        return self._chunk([CompletionChoice(index=choice.index, text=event.text, logprobs=lp)])

    def closing(self, choice: Choice, finish: Finish) -> str:
        return self._chunk([CompletionChoice(index=choice.index, text="", finish_reason=finish_reason(finish))])

    def usage_chunk(self, usage: UsageInfo) -> str:
        return self._chunk([], usage)

    def response(self, choices: list[Choice]) -> CompletionResponse:
        return CompletionResponse(
            id=self.ids.id, created=self.ids.created, model=self.ids.model, usage=usage_of(choices),
            choices=[CompletionChoice(index=c.index, text=c.prefix + c.text,
                                      logprobs=completion_logprobs(c.logprobs, len(c.prefix))
                                      if self.want_logprobs else None,
                                      finish_reason=finish_reason(c.finish)) for c in choices])


# --- streaming -------------------------------------------------------------------------------------------------

def sse(data: str) -> str:
    return "data: " + data + "\n\n"


def stream_error(error: EngineError) -> str:
    """A stream the server ends early: an OpenAI-shaped error event, then [DONE], so it is never a silent cut."""
    return sse(error_response_body(error).model_dump_json()) + SSE_DONE


async def stream(choice_set: ChoiceSet, shape: Shape) -> AsyncIterator[str]:
    """SSE for every choice of `choice_set`, in arrival order, ending with [DONE] whatever happens."""
    try:
        preamble = shape.preamble()
        if preamble:
            yield preamble
        for c in choice_set.choices:
            opening = shape.opening(c)
            if opening:
                yield opening
        async for c, event in choice_set.events():
            if isinstance(event, Delta):
                if event.text or (shape.want_logprobs and event.logprobs):
                    text = shape.delta(c, event)
                    if text:
                        yield text
            elif event.error is not None:
                log.warning("stream ended by the server: %s", event.error)
                yield shape.error_event(event.error)
                return
            else:
                closing = shape.closing(c, event)
                if closing:
                    yield closing
        yield shape.epilogue(choice_set.choices)
    finally:
        choice_set.cancel()

