"""What flows between the HTTP layer and the engine: the protocol, requests, events, errors.

The engine runs on its own thread; a `RequestHandle` carries events back to
the asyncio loop that submitted the request, and carries cancellation the
other way.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol


class EngineError(Exception):
    """A request the engine cannot serve. `code` is a stable machine-readable reason (OpenAI's where one
    exists), `param` the request field at fault; the API layer maps the class to an HTTP answer."""

    code: str | None = None
    param: str | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        if param is not None:
            self.param = param


class InvalidRequestError(EngineError):
    """The request itself is wrong: retrying it unchanged will fail again."""


class ContextLengthError(InvalidRequestError):
    code = "context_length_exceeded"


class QueueFullError(EngineError):
    """Every sequence is busy and the queue is full: retry later."""

    code = "queue_full"


class EngineUnavailableError(EngineError):
    """The engine cannot serve now (loading, shutting down)."""

    code = "model_not_ready"


class ShuttingDownError(EngineUnavailableError):
    """The server is stopping: new requests are refused, and at the end of a drain running ones are ended."""

    code = "shutting_down"


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
    seed: int | None = None
    grammar: str | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (-100 bans it)


@dataclass
class GenerationRequest:
    """A tokenized prompt and how to continue it."""

    prompt_tokens: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: off; k >= 0: chosen token plus k alternatives
    ignore_eos: bool = False
    render_special: bool = False  # write control tokens as text ([TOOL_CALLS], <|python_tag|>) for the output parser


@dataclass
class TopLogprob:
    token: str
    logprob: float
    bytes: list[int]


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]
    top: list[TopLogprob]


@dataclass
class ChatPrompt:
    """A rendered, tokenized chat and the strings that end the assistant's turn in its template."""

    tokens: list[int]
    stop: list[str]
    opens_reasoning: bool = False  # the generation prompt ends inside a <think> span (Qwen3, DeepSeek-R1)


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
    error: EngineError | None = None
    stop_sequence: str | None = None  # the stop string that ended a "stop" finish (None: end of generation)


Event = Delta | Finish


class Outbox:
    """The events one engine step produced, delivered with one wake-up per event loop instead of one per event.

    Only the thread that bound it collects into it (the engine thread, which flushes after every step and before
    it sleeps); an emit from any other thread goes straight to the loop.
    """

    def __init__(self) -> None:
        self._owner: int | None = None
        self._items: list[tuple[RequestHandle, Event]] = []

    def bind(self) -> None:
        self._owner = threading.get_ident()

    def collects(self) -> bool:
        return threading.get_ident() == self._owner

    def add(self, handle: RequestHandle, event: Event) -> None:
        self._items.append((handle, event))

    def flush(self) -> None:
        if not self._items:
            return
        items, self._items = self._items, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, Event]]] = {}
        for handle, event in items:
            by_loop.setdefault(handle._loop, []).append((handle, event))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                for handle, _ in batch:
                    handle._cancelled.set()


def _deliver(batch: list[tuple[RequestHandle, Event]]) -> None:
    for handle, event in batch:
        handle._queue.put_nowait(event)


class RequestHandle:
    """The submitter's end: an async stream of events and a cancel switch."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop,
                 outbox: Outbox | None = None) -> None:
        self.request = request
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._outbox = outbox
        self.sampler: Any | None = None  # the engine's per-request sampler, freed when the request ends

    # engine side -------------------------------------------------------------
    def emit(self, event: Event) -> None:
        """Called from the engine thread (collected into its outbox) or, for a refusal, any thread."""
        if self._outbox is not None and self._outbox.collects():
            self._outbox.add(self, event)
            return
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

    async def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event, or None if `timeout` passes first."""
        try:
            if timeout is None:
                event = await self._queue.get()
            else:
                event = await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None
        return event


class EngineProtocol(Protocol):
    """What the API needs from an engine; the real one (engine.LlamaEngine) and the tests' fake provide it.

    Declared here, beside the types it speaks, so naming it never imports llama.cpp.
    """

    model_id: str
    n_ctx: int  # the KV cache's cells
    n_ctx_seq: int  # the most one request may use (prompt + completion): the whole cache
    parallel: int
    capacity: int  # requests held at once (sequences + queue): a request needing more can never be admitted
    embeddings_enabled: bool

    @property
    def output_format(self) -> Any: ...  # app.engine.toolcalls.ChatFormat: how to read the model's output
    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    template_kwargs: dict[str, Any] | None = None) -> ChatPrompt: ...
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]: ...
    def detokenize(self, tokens: list[int]) -> str: ...
    def token_piece(self, token: int) -> str: ...
    def valid_token(self, token: int) -> bool: ...
    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> RequestHandle: ...
    def abort(self, message: str) -> None: ...
    async def embed(self, inputs: list[list[int]]) -> list[list[float]]: ...
    @property
    def queue_depth(self) -> int: ...
    @property
    def active(self) -> int: ...
    @property
    def kv_cells_used(self) -> int: ...
    @property
    def preemptions(self) -> int: ...
    def context_info(self) -> dict[str, Any]: ...  # what /health reports of the context
    def close(self) -> None: ...
