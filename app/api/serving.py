"""The logic behind /v1/chat/completions and /v1/completions: build engine requests, shape replies.

Routing lives in routes.py; this module turns validated requests into
`GenerationRequest`s, merges the engine's events for every choice, and writes
them in OpenAI's wire format, streamed (SSE) or whole.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from fastapi import Request

from app.api.errors import APIError
from app.api.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from app.engine.engine import EngineProtocol
from app.engine.sampling import grammar_for_response_format
from app.engine.types import Delta, EngineError, Finish, GenerationRequest, RequestHandle, SamplingParams, TokenLogprob

log = logging.getLogger(__name__)


@dataclass
class Choice:
    """One choice being generated: its handle and what it produced so far."""

    index: int
    handle: RequestHandle
    prefix: str = ""  # echoed prompt text (completions)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: Optional[Finish] = None
    prompt_index: int = 0


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


def usage_of(choices: list[Choice]) -> Usage:
    usage = Usage()
    seen_prompts: set[int] = set()
    for c in choices:
        if c.finish is None:
            continue
        usage.completion_tokens += c.finish.completion_tokens
        if c.prompt_index not in seen_prompts:
            seen_prompts.add(c.prompt_index)
            usage.prompt_tokens += c.finish.prompt_tokens
            usage.cached_tokens += c.finish.cached_tokens
    return usage


def sampling_of(body: SamplingFields, seed_offset: int, grammar: Optional[str]) -> SamplingParams:
    seed = None if body.seed is None else body.seed + seed_offset
    return SamplingParams(
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        repeat_penalty=body.repeat_penalty, seed=seed, grammar=grammar,
    )


def resolve_max_tokens(requested: Optional[int], n_prompt: int, n_ctx_seq: int) -> int:
    """OpenAI semantics: no max_tokens means 'until the context is full'."""
    if requested is not None:
        return requested
    room = n_ctx_seq - n_prompt
    if room < 1:
        raise APIError(400, f"The prompt has {n_prompt} tokens; this model's context per sequence is {n_ctx_seq}.",
                       code="context_length_exceeded", param="messages")
    return room


class ChoiceSet:
    """Submits every choice to the engine and merges their events in arrival order."""

    def __init__(self, engine: EngineProtocol) -> None:
        self.engine = engine
        self.choices: list[Choice] = []
        self.started_at = time.monotonic()
        self.first_token_at: Optional[float] = None

    async def submit(self, requests: list[tuple[int, GenerationRequest, str]], param: str) -> None:
        """Queue every choice; a request that could never fit the system at once is a 400, not a 429."""
        if len(requests) > self.engine.capacity:
            raise APIError(400, f"The request needs {len(requests)} sequences (prompts × n); this server holds at "
                                f"most {self.engine.capacity} at once (parallel + max_queue).", param=param)
        loop = asyncio.get_running_loop()
        try:
            for prompt_index, req, prefix in requests:
                if req.sampling.grammar:
                    # Compiling the grammar can take a while: not on the event loop.
                    handle = await asyncio.to_thread(self.engine.submit, req, loop)
                else:
                    handle = self.engine.submit(req, loop)
                self.choices.append(Choice(len(self.choices), handle, prefix, prompt_index=prompt_index))
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        for c in self.choices:
            if c.finish is None:
                c.handle.cancel()

    async def events(self) -> AsyncIterator[tuple[Choice, Delta | Finish]]:
        async for choice, event in self._merged():
            if self.first_token_at is None and isinstance(event, Delta) and event.token_ids:
                self.first_token_at = time.monotonic()
            yield choice, event

    async def _merged(self) -> AsyncIterator[tuple[Choice, Delta | Finish]]:
        if len(self.choices) == 1:
            choice = self.choices[0]
            while choice.finish is None:
                event = await choice.handle.next_event()
                assert event is not None
                if isinstance(event, Finish):
                    choice.finish = event
                yield choice, event
            return
        merged: asyncio.Queue[tuple[Choice, Delta | Finish]] = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            while True:
                event = await choice.handle.next_event()
                assert event is not None
                await merged.put((choice, event))
                if isinstance(event, Finish):
                    return

        tasks = [asyncio.create_task(pump(c)) for c in self.choices]
        try:
            remaining = len(self.choices)
            while remaining:
                choice, event = await merged.get()
                if isinstance(event, Finish):
                    choice.finish = event
                    remaining -= 1
                yield choice, event
        finally:
            for t in tasks:
                t.cancel()

    def first_error(self) -> Optional[EngineError]:
        for c in self.choices:
            if c.finish is not None and c.finish.error is not None:
                return c.finish.error
        return None


async def until_disconnect(receive: Callable[[], Awaitable[Any]], on_disconnect: Callable[[], None]) -> None:
    """Wait for the client to go away (the body is already read), then cancel its work."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return


def sse(data: dict[str, Any]) -> str:
    return "data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False) + "\n\n"


SSE_DONE = "data: [DONE]\n\n"


# --- chat ---------------------------------------------------------------------------------

def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    return {"content": [
        {"token": e.token, "logprob": e.logprob, "bytes": e.bytes,
         "top_logprobs": [{"token": t, "logprob": lp, "bytes": b} for t, lp, b in e.top]}
        for e in entries
    ], "refusal": None}


async def build_chat(engine: EngineProtocol, body: ChatCompletionRequest) -> list[tuple[int, GenerationRequest, str]]:
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    tokens, template_stop = await asyncio.to_thread(engine.chat_prompt, messages)
    grammar = await asyncio.to_thread(grammar_for_response_format, body.response_format)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = resolve_max_tokens(requested, len(tokens), engine.n_ctx_seq)
    top = None
    if body.logprobs:
        top = body.top_logprobs or 0
    elif body.top_logprobs is not None:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    stop = list(body.stop or []) + [s for s in template_stop if s not in (body.stop or [])]
    return [
        (0, GenerationRequest(tokens, max_tokens, sampling_of(body, i, grammar), stop, top, body.ignore_eos), "")
        for i in range(body.n)
    ]


def chat_response(model: str, rid: str, created: int, choices: list[Choice], want_logprobs: bool) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{
            "index": c.index,
            "message": {"role": "assistant", "content": c.text, "refusal": None},
            "logprobs": chat_logprobs(c.logprobs) if want_logprobs else None,
            "finish_reason": finish_reason(c.finish),
        } for c in choices],
        "usage": usage_of(choices).as_dict(),
        "system_fingerprint": None,
    }


async def stream_chat(choice_set: ChoiceSet, model: str, rid: str, created: int,
                      want_logprobs: bool, include_usage: bool) -> AsyncIterator[str]:
    def chunk(choices: list[dict[str, Any]], usage: Optional[dict[str, Any]] = None) -> str:
        data: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                                "system_fingerprint": None, "choices": choices}
        if include_usage:
            data["usage"] = usage
        return sse(data)

    try:
        for c in choice_set.choices:
            yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None}])
        async for c, event in choice_set.events():
            if isinstance(event, Delta):
                if not event.text and not (want_logprobs and event.logprobs):
                    continue
                yield chunk([{"index": c.index, "delta": {"content": event.text},
                              "logprobs": chat_logprobs(event.logprobs) if want_logprobs else None,
                              "finish_reason": None}])
            elif event.error is not None:
                yield stream_error(event.error)
                return
            else:
                yield chunk([{"index": c.index, "delta": {}, "logprobs": None,
                              "finish_reason": finish_reason(event)}])
        if include_usage:
            yield chunk([], usage_of(choice_set.choices).as_dict())
        yield SSE_DONE
    finally:
        choice_set.cancel()


# --- completions ---------------------------------------------------------------------------

def completion_logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    tokens, lps, tops, offsets = [], [], [], []
    pos = offset
    for e in entries:
        tokens.append(e.token)
        lps.append(e.logprob)
        tops.append({t: lp for t, lp, _ in e.top})
        offsets.append(pos)
        pos += len(e.token)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


async def build_completion(engine: EngineProtocol, body: CompletionRequest) -> list[tuple[int, GenerationRequest, str]]:
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo together with logprobs is not supported (prompt log-probabilities are not kept)",
                       param="echo")
    if body.suffix:
        raise APIError(400, "suffix (insertion) is not supported by this server", param="suffix")
    prompts: list[Any]
    raw = body.prompt
    if isinstance(raw, str):
        prompts = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        prompts = [raw]
    else:
        prompts = list(raw)
    grammar = await asyncio.to_thread(grammar_for_response_format, body.response_format)
    out: list[tuple[int, GenerationRequest, str]] = []
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
            out.append((p_index, req, text if body.echo else ""))
    return out


def check_token_ids(engine: EngineProtocol, tokens: list[int], param: str) -> list[int]:
    """Token ids from a client, refused (400) if empty or outside the vocabulary, never handed to llama.cpp."""
    if not tokens:
        raise APIError(400, f"{param}: a token list must not be empty", param=param)
    bad = [t for t in tokens if not engine.valid_token(t)]
    if bad:
        raise APIError(400, f"{param}: token ids outside the vocabulary: {bad[:5]}", param=param)
    return [int(t) for t in tokens]


def completion_response(model: str, rid: str, created: int, choices: list[Choice],
                        want_logprobs: bool) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{
            "index": c.index, "text": c.prefix + c.text,
            "logprobs": completion_logprobs(c.logprobs, len(c.prefix)) if want_logprobs else None,
            "finish_reason": finish_reason(c.finish),
        } for c in choices],
        "usage": usage_of(choices).as_dict(),
        "system_fingerprint": None,
    }


async def stream_completion(choice_set: ChoiceSet, model: str, rid: str, created: int,
                            want_logprobs: bool, include_usage: bool) -> AsyncIterator[str]:
    def chunk(choices: list[dict[str, Any]], usage: Optional[dict[str, Any]] = None) -> str:
        data: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created, "model": model,
                                "system_fingerprint": None, "choices": choices}
        if include_usage:
            data["usage"] = usage
        return sse(data)

    try:
        offsets = {c.index: len(c.prefix) for c in choice_set.choices}
        for c in choice_set.choices:
            if c.prefix:
                yield chunk([{"index": c.index, "text": c.prefix, "logprobs": None, "finish_reason": None}])
        async for c, event in choice_set.events():
            if isinstance(event, Delta):
                if not event.text and not (want_logprobs and event.logprobs):
                    continue
                lp = completion_logprobs(event.logprobs, offsets[c.index]) if want_logprobs else None
                offsets[c.index] += len(event.text)
                yield chunk([{"index": c.index, "text": event.text, "logprobs": lp, "finish_reason": None}])
            elif event.error is not None:
                yield stream_error(event.error)
                return
            else:
                yield chunk([{"index": c.index, "text": "", "logprobs": None, "finish_reason": finish_reason(event)}])
        if include_usage:
            yield chunk([], usage_of(choice_set.choices).as_dict())
        yield SSE_DONE
    finally:
        choice_set.cancel()


# --- shared -----------------------------------------------------------------------------------

def finish_reason(finish: Optional[Finish]) -> Optional[str]:
    if finish is None:
        return None
    return "length" if finish.reason == "length" else "stop"


def error_payload(error: EngineError) -> dict[str, Any]:
    return {"error": {"message": str(error), "type": error.error_type, "param": error.param, "code": error.code}}


def stream_error(error: EngineError) -> str:
    """A stream the server ends early: an OpenAI-shaped error event, then [DONE], so it is never a silent cut."""
    log.warning("stream ended by the server: %s", error)
    return sse(error_payload(error)) + SSE_DONE


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


async def collect(choice_set: ChoiceSet, request: Request) -> None:
    """Run every choice to its end, cancelling all of them if the client disconnects."""
    watcher = asyncio.create_task(until_disconnect(request.receive, choice_set.cancel))
    try:
        async for choice, event in choice_set.events():
            if isinstance(event, Delta):
                choice.text += event.text
                choice.logprobs.extend(event.logprobs)
    finally:
        watcher.cancel()
        choice_set.cancel()
