"""A scriptable fake engine for fast tests of routing, auth, errors and queueing.

It speaks the same contract as the real engine (EngineProtocol): one token per
character, replies taken from a queue, every submitted request recorded.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from app.engine.text import TextStream
from app.engine.toolcalls import ChatFormat, detect_format
from app.engine.types import (
    ChatPrompt,
    ContextLengthError,
    Delta,
    EngineUnavailableError,
    Finish,
    GenerationRequest,
    QueueFullError,
    RequestHandle,
    TokenLogprob,
    TopLogprob,
)


class FakeEngine:
    def __init__(self, replies: list[str] | None = None, n_ctx_seq: int = 256, parallel: int = 2,
                 max_queue: int = 2, token_delay: float = 0.0, embeddings: bool = True) -> None:
        self.model_id = "fake-model.gguf"
        self.n_ctx = n_ctx_seq
        self.n_ctx_seq = n_ctx_seq
        self.preemptions = 0
        self.parallel = parallel
        self.max_queue = max_queue
        self.embeddings_enabled = embeddings
        self.replies: deque[str] = deque(replies or [])
        self.default_reply = "Hello from the fake engine."
        self.token_delay = token_delay
        self.requests: list[GenerationRequest] = []
        self.cancelled: list[GenerationRequest] = []
        self.in_system = 0
        self.closed = False
        self.chat_format = detect_format(None)  # ChatML: no tool-call syntax
        self.aborted: EngineUnavailableError | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # prompts
    @property
    def output_format(self) -> ChatFormat:
        return self.chat_format

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    template_kwargs: dict[str, Any] | None = None) -> ChatPrompt:
        text = "".join(f"<{m['role']}>{m.get('content') or ''}" for m in messages) + "<assistant>"
        return ChatPrompt(self.tokenize(text), ["<end>"])

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def detokenize(self, tokens: list[int]) -> str:
        return "".join(chr(t) for t in tokens)

    def token_piece(self, token: int) -> str:
        return chr(token)

    def valid_token(self, token: int) -> bool:
        return 0 <= token < 0x110000

    @property
    def queue_depth(self) -> int:
        return max(0, self.in_system - self.parallel)

    @property
    def active(self) -> int:
        return min(self.in_system, self.parallel)

    @property
    def kv_cells_used(self) -> int:
        return 0

    def context_info(self) -> dict[str, Any]:
        return {"n_ctx": self.n_ctx, "max_request_tokens": self.n_ctx_seq, "n_ctx_train": self.n_ctx,
                "kv_cache_type_k": "f16", "kv_cache_type_v": "f16", "kv_cells_used": 0}

    # generation
    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> RequestHandle:
        if len(request.prompt_tokens) + request.max_tokens > self.n_ctx_seq:
            raise ContextLengthError(f"context per sequence is {self.n_ctx_seq} tokens")
        if self.in_system >= self.parallel + self.max_queue:
            raise QueueFullError("the server is busy: all sequences are in use and the queue is full")
        self.in_system += 1
        self.requests.append(request)
        reply = self.replies.popleft() if self.replies else self.default_reply
        handle = RequestHandle(request, loop)
        # submit may be called from a worker thread (requests with a grammar): start on the loop's own thread.
        loop.call_soon_threadsafe(self._start, loop, handle, reply)
        return handle

    def _start(self, loop: asyncio.AbstractEventLoop, handle: RequestHandle, reply: str) -> None:
        task = loop.create_task(self._generate(handle, reply))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def capacity(self) -> int:
        return self.parallel + self.max_queue

    def abort(self, message: str) -> None:
        self.aborted = EngineUnavailableError(message)

    async def _generate(self, handle: RequestHandle, reply: str) -> None:
        req = handle.request
        stream = TextStream(req.stop)
        n = 0
        reason = "stop"
        try:
            for ch in reply:
                if handle.cancelled:
                    self.cancelled.append(req)
                    reason = "cancelled"
                    break
                if self.aborted is not None:
                    handle.emit(Finish("error", len(req.prompt_tokens), n, 0, self.aborted))
                    return
                if n >= req.max_tokens:
                    reason = "length"
                    break
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                else:
                    await asyncio.sleep(0)
                n += 1
                alternatives = [TopLogprob(ch, -0.5, list(ch.encode()))] * (req.logprobs or 0)
                lps = [TokenLogprob(ch, -0.5, list(ch.encode()), alternatives)] \
                    if req.logprobs is not None else []
                text = stream.push(ch.encode())
                handle.emit(Delta(text, [ord(ch)], lps))
                if stream.stopped:
                    break
            else:
                tail = stream.flush()
                if tail:
                    handle.emit(Delta(tail, [], []))
            handle.emit(Finish(reason, len(req.prompt_tokens), n, 0,
                               stop_sequence=stream.stop_hit if stream.stopped else None))
        finally:
            self.in_system -= 1

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        return [[float(len(t)), 0.0, 1.0] for t in inputs]

    def close(self) -> None:
        self.closed = True
