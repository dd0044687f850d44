"""The choices of one request: submitted together, their engine events merged, their usage summed.

Serving modules (chat, text completions, and whatever else generates) build `ChoiceSpec`s, hand them to a
`ChoiceSet`, then either stream its events or `collect` them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from app.api.errors import APIError
from app.api.protocol import PromptTokensDetails, UsageInfo
from app.engine.types import Delta, EngineError, EngineProtocol, Finish, GenerationRequest, RequestHandle, TokenLogprob


@dataclass
class ChoiceSpec:
    """One choice to generate: which prompt of the request it continues, the engine request, echoed text."""

    prompt_index: int
    request: GenerationRequest
    echo: str = ""


@dataclass
class Choice:
    """One choice being generated: its handle and what it produced so far."""

    index: int
    handle: RequestHandle
    prefix: str = ""  # echoed prompt text (completions)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: Finish | None = None
    prompt_index: int = 0


def usage_of(choices: list[Choice]) -> UsageInfo:
    """Each prompt counted once (n choices of one prompt share it), every choice's completion counted."""
    prompt = completion = cached = 0
    seen_prompts: set[int] = set()
    for c in choices:
        if c.finish is None:
            continue
        completion += c.finish.completion_tokens
        if c.prompt_index not in seen_prompts:
            seen_prompts.add(c.prompt_index)
            prompt += c.finish.prompt_tokens
            cached += c.finish.cached_tokens
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


class ChoiceSet:
    """Submits every choice to the engine and merges their events in arrival order."""

    def __init__(self, engine: EngineProtocol) -> None:
        self.engine = engine
        self.choices: list[Choice] = []
        self.started_at = time.monotonic()
        self.first_token_at: float | None = None

    async def submit(self, specs: list[ChoiceSpec], param: str) -> None:
        """Queue every choice; a request that could never fit the system at once is a 400, not a 429."""
        if len(specs) > self.engine.capacity:
            raise APIError(400, f"The request needs {len(specs)} sequences (prompts × n); this server holds at "
                                f"most {self.engine.capacity} at once (parallel + max_queue).", param=param)
        loop = asyncio.get_running_loop()
        try:
            for spec in specs:
                if spec.request.sampling.grammar:
                    # Compiling the grammar can take a while: not on the event loop.
                    handle = await asyncio.to_thread(self.engine.submit, spec.request, loop)
                else:
                    handle = self.engine.submit(spec.request, loop)
                self.choices.append(Choice(len(self.choices), handle, spec.echo, prompt_index=spec.prompt_index))
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

    def first_error(self) -> EngineError | None:
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
