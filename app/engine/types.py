"""What flows between the HTTP layer and the engine: requests, events, errors.

The engine runs on its own thread; a `RequestHandle` carries events back to
the asyncio loop that submitted the request, and carries cancellation the
other way.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any, Optional, Union


class EngineError(Exception):
    """A request the engine cannot serve; `code` and `status` shape the HTTP error."""

    status = 500
    code: Optional[str] = None
    error_type = "server_error"
    param: Optional[str] = None

    def __init__(self, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        if param is not None:
            self.param = param


class InvalidRequestError(EngineError):
    status = 400
    error_type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    code = "context_length_exceeded"


class QueueFullError(EngineError):
    status = 429
    code = "queue_full"
    error_type = "rate_limit_error"


class EngineUnavailableError(EngineError):
    status = 503
    code = "model_not_ready"
    error_type = "service_unavailable"


@dataclass
class SamplingParams:
    """Per-request sampling, mapped onto a llama.cpp sampler chain."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    seed: Optional[int] = None
    grammar: Optional[str] = None


@dataclass
class GenerationRequest:
    """A tokenized prompt and how to continue it."""

    prompt_tokens: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    logprobs: Optional[int] = None  # None: off; k >= 0: chosen token plus k alternatives
    ignore_eos: bool = False


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[str, float, list[int]]]


@dataclass
class Delta:
    """Text produced since the last event (may be empty while a stop string is pending)."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]


@dataclass
class Finish:
    reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    error: Optional[EngineError] = None


Event = Union[Delta, Finish]


class RequestHandle:
    """The submitter's end: an async stream of events and a cancel switch."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = threading.Event()
        self.finished = False
        self.sampler: Optional[Any] = None  # the engine's per-request sampler, freed when the request ends

    # engine side -------------------------------------------------------------
    def emit(self, event: Event) -> None:
        """Called from the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:
            # The loop is closed: nobody is listening any more.
            self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # submitter side ----------------------------------------------------------
    def cancel(self) -> None:
        self._cancelled.set()

    async def next_event(self, timeout: Optional[float] = None) -> Optional[Event]:
        """The next event, or None if `timeout` passes first."""
        try:
            if timeout is None:
                event = await self._queue.get()
            else:
                event = await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None
        if isinstance(event, Finish):
            self.finished = True
        return event


def finish_reason_for(finish: Finish) -> str:
    return "length" if finish.reason == "length" else "stop"


JSONDict = dict[str, Any]
