"""Continuous batching: one thread owns the llama context and decodes every active sequence together.

Each request gets a sequence (slot) of the unified KV cache. Every step the
scheduler puts one token per generating sequence into a shared batch, fills
the rest of the batch with prompt tokens in bounded chunks (so a long prompt
does not stall running streams), calls `llama_decode` once, and samples each
sequence with its own llama.cpp sampler chain. New requests are admitted
between steps. A prompt that starts with tokens some sequence already holds
reuses them: from the slot's own cache, or copied (by reference, in the
unified cache) from another sequence, waiting briefly for a sequence that is
computing that same prefix right now.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import llama_cpp

from app.engine.model import LlamaModel
from app.engine.sampling import SamplerChain, logits_at, token_logprobs
from app.engine.text import TextStream
from app.engine.types import (
    ContextLengthError,
    Delta,
    EngineError,
    Finish,
    GenerationRequest,
    QueueFullError,
    RequestHandle,
    ShuttingDownError,
    TokenLogprob,
    TopLogprob,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# A shared prefix shorter than this is recomputed rather than waited for.
MIN_SHARED_PREFIX = 32


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _Slot:
    seq_id: int
    cache: list[int] = field(default_factory=list)  # tokens whose KV this sequence holds, positions 0..n-1
    handle: RequestHandle | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens still to decode
    wait_for: tuple[_Slot, int] | None = None  # copy this many tokens from that slot once computed
    text: TextStream | None = None
    next_token: int | None = None
    n_prompt: int = 0
    n_cached: int = 0
    n_generated: int = 0
    held_logprobs: list[TokenLogprob] = field(default_factory=list)
    held_tokens: list[int] = field(default_factory=list)

    @property
    def busy(self) -> bool:
        return self.handle is not None


class Scheduler:
    """Owns the generation context; `submit` from any thread, events come back per request."""

    def __init__(self, model: LlamaModel, parallel: int, max_queue: int, n_batch: int) -> None:
        self.model = model
        self.parallel = parallel
        self.max_queue = max_queue
        self.n_batch = n_batch
        self.n_ctx_seq = model.n_ctx // parallel
        self._slots = [_Slot(i) for i in range(parallel)]
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._jobs: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._in_system = 0
        self._abort: EngineError | None = None
        self._batch = llama_cpp.llama_batch_init(max(n_batch, parallel), 0, 1)
        self._thread = threading.Thread(target=self._run, name="engine-scheduler", daemon=True)

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the engine thread; True when it ended. The batch is freed only then: a thread still inside
        llama_decode (a long step) keeps using it, and freeing it under that thread would crash the process."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the engine thread did not stop within %.0f s; leaving its buffers to the process exit",
                        timeout)
            return False
        llama_cpp.llama_batch_free(self._batch)
        return True

    # --- submission (any thread) -------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return sum(1 for s in self._slots if s.busy)

    @property
    def capacity(self) -> int:
        """Requests the system holds at once: one per sequence plus the queue."""
        return self.parallel + self.max_queue

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop,
               sampler: SamplerChain) -> RequestHandle:
        """Queue a request whose sampler was already built (and so validated) by the caller.

        The scheduler owns `sampler` from here on and frees it when the request finishes; on a refusal
        (raised here) the caller still owns it.
        """
        if self._stop.is_set() or self._abort is not None:
            raise ShuttingDownError("the server is shutting down")
        n_prompt = len(request.prompt_tokens)
        if n_prompt == 0:
            raise ContextLengthError("the prompt is empty after tokenization", param="prompt")
        if n_prompt + request.max_tokens > self.n_ctx_seq:
            raise ContextLengthError(
                f"This model's context per sequence is {self.n_ctx_seq} tokens (n_ctx {self.model.n_ctx} / "
                f"parallel {self.parallel}); the request needs {n_prompt} prompt + {request.max_tokens} "
                "completion tokens. Shorten the prompt or lower max_tokens."
            )
        handle = RequestHandle(request, loop)
        handle.sampler = sampler
        with self._lock:
            if self._in_system >= self.capacity:
                raise QueueFullError("the server is busy: all sequences are in use and the queue is full")
            self._in_system += 1
            self._waiting.append(handle)
        self._wake.set()
        return handle

    @property
    def in_system(self) -> int:
        """Requests admitted or queued and not yet finished (returns to 0 whatever happened to them)."""
        return self._in_system

    def abort(self, error: EngineError) -> None:
        """Finish every running and queued request with `error` (at the end of a drain); new ones are refused."""
        with self._lock:
            self._abort = error
        self._wake.set()

    def run_job(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run `fn` on the engine thread between steps (for work on the model's contexts)."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            self._jobs.append((fn, fut))
        self._wake.set()
        return asyncio.wrap_future(fut)

    # --- the engine thread ----------------------------------------------------------------

    def _run(self) -> None:
        log.debug("scheduler started: %d sequences of %d tokens", self.parallel, self.n_ctx_seq)
        while not self._stop.is_set():
            try:
                if self._abort is not None:
                    self._fail_everything(self._abort)
                self._run_jobs()
                self._drop_cancelled()
                self._admit()
                if not any(s.busy for s in self._slots):
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                self._step()
            except Exception as exc:  # never let one bad step kill the engine; fail only what it touched
                log.error("engine step failed: %s: %s", type(exc).__name__, exc,
                          exc_info=log.isEnabledFor(logging.DEBUG))
                self._fail_all(EngineError(f"internal engine error: {type(exc).__name__}"))
        self._fail_everything(ShuttingDownError("the server is shutting down"))

    def _fail_everything(self, error: EngineError) -> None:
        self._fail_all(error)
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for handle in waiting:
            self._emit_finish(handle, Finish("error", len(handle.request.prompt_tokens), 0, 0, error))

    def _run_jobs(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    return
                fn, fut = self._jobs.popleft()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

    def _emit_finish(self, handle: RequestHandle, finish: Finish) -> None:
        """The one place a request leaves the system: its place is released first (a client that resubmits at
        once finds it free), whatever closing the sampler or delivering the event then does."""
        with self._lock:
            self._in_system -= 1
        try:
            if handle.sampler is not None:
                handle.sampler.close()
                handle.sampler = None
            handle.emit(finish)
        except Exception:
            log.error("could not deliver the end of a request", exc_info=log.isEnabledFor(logging.DEBUG))

    def _finish(self, slot: _Slot, reason: str, error: EngineError | None = None) -> None:
        handle = slot.handle
        if handle is None:
            return
        text = slot.text
        finish = Finish(reason, slot.n_prompt, slot.n_generated, slot.n_cached, error,
                        stop_sequence=text.stop_hit if text is not None and text.stopped else None)
        slot.handle = None
        slot.text = None
        slot.next_token = None
        slot.pending = []
        slot.wait_for = None
        held_tokens, held_logprobs = slot.held_tokens, slot.held_logprobs
        slot.held_logprobs = []
        slot.held_tokens = []
        try:
            if text is not None and reason in ("stop", "length") and error is None:
                tail = text.flush()
                if tail or held_logprobs:
                    handle.emit(Delta(tail, held_tokens, held_logprobs))
        finally:
            self._emit_finish(handle, finish)

    def _fail_all(self, error: EngineError) -> None:
        for slot in self._slots:
            if slot.busy:
                self._fail(slot, error)

    def _fail(self, slot: _Slot, error: EngineError) -> None:
        """End one sequence with an error and drop its cache (its state is not trusted any more)."""
        self._finish(slot, "error", error)
        self._forget(slot)

    def _forget(self, slot: _Slot) -> None:
        llama_cpp.llama_memory_seq_rm(self.model.memory, slot.seq_id, 0, -1)
        slot.cache = []

    def _drop_cancelled(self) -> None:
        for slot in self._slots:
            if slot.busy and slot.handle is not None and slot.handle.cancelled:
                self._finish(slot, "cancelled")
        with self._lock:
            cancelled = [h for h in self._waiting if h.cancelled]
            for h in cancelled:
                self._waiting.remove(h)
        for h in cancelled:
            self._emit_finish(h, Finish("cancelled", len(h.request.prompt_tokens), 0, 0))

    # --- admission and prefix reuse ------------------------------------------------------

    def _admit(self) -> None:
        while True:
            free = [s for s in self._slots if not s.busy and not self._is_donor(s)]
            if not free:
                return
            with self._lock:
                if not self._waiting:
                    return
                handle = self._waiting.popleft()
            try:
                self._assign(handle, free)
            except Exception as exc:  # this request's problem only: it ends, its place is released
                if not isinstance(exc, EngineError):
                    log.error("admitting a request failed: %s: %s", type(exc).__name__, exc)
                    exc = EngineError(f"internal engine error: {type(exc).__name__}")
                for slot in free:
                    if slot.handle is handle:
                        slot.handle = None
                        self._forget(slot)
                self._emit_finish(handle, Finish("error", len(handle.request.prompt_tokens), 0, 0, exc))

    def _is_donor(self, slot: _Slot) -> bool:
        return any(s.wait_for is not None and s.wait_for[0] is slot for s in self._slots)

    def _assign(self, handle: RequestHandle, free: list[_Slot]) -> None:
        req = handle.request
        prompt = req.prompt_tokens
        limit = len(prompt) - 1  # the last prompt token is always decoded, to get its logits

        own = max(free, key=lambda s: common_prefix(s.cache, prompt))
        own_n = min(common_prefix(own.cache, prompt), limit)

        donor: _Slot | None = None
        donor_n = 0
        pending_donor: _Slot | None = None
        pending_n = 0
        for s in self._slots:
            if s is own:
                continue
            n = min(common_prefix(s.cache, prompt), limit)
            if n > donor_n:
                donor, donor_n = s, n
            if s.busy and s.pending and s.wait_for is None:
                m = min(common_prefix(s.cache + s.pending, prompt), limit)
                if m > pending_n:
                    pending_donor, pending_n = s, m

        slot = own
        wait_for: tuple[_Slot, int] | None = None
        worth_waiting = pending_n >= MIN_SHARED_PREFIX and pending_n > max(own_n, donor_n) + MIN_SHARED_PREFIX
        if pending_donor is not None and worth_waiting:
            slot = min(free, key=lambda s: len(s.cache))
            self._forget(slot)
            wait_for = (pending_donor, pending_n)
            reused = 0
        elif donor is not None and donor_n > own_n:
            slot = min(free, key=lambda s: len(s.cache))
            self._forget(slot)
            llama_cpp.llama_memory_seq_cp(self.model.memory, donor.seq_id, slot.seq_id, 0, donor_n)
            slot.cache = prompt[:donor_n]
            reused = donor_n
        else:
            if not llama_cpp.llama_memory_seq_rm(self.model.memory, slot.seq_id, own_n, -1):
                self._forget(slot)
                own_n = 0
            slot.cache = slot.cache[:own_n]
            reused = own_n

        slot.handle = handle
        slot.text = TextStream(req.stop)
        slot.pending = prompt[len(slot.cache):] if wait_for is None else []
        slot.wait_for = wait_for
        slot.next_token = None
        slot.n_prompt = len(prompt)
        slot.n_cached = reused
        slot.n_generated = 0
        slot.held_logprobs = []
        slot.held_tokens = []

    def _resolve_waits(self) -> None:
        for slot in self._slots:
            if slot.wait_for is None or slot.handle is None:
                continue
            donor, n = slot.wait_for
            prompt = slot.handle.request.prompt_tokens
            if len(donor.cache) >= n and donor.cache[:n] == prompt[:n]:
                llama_cpp.llama_memory_seq_cp(self.model.memory, donor.seq_id, slot.seq_id, 0, n)
                slot.cache = prompt[:n]
                slot.n_cached = n
            elif donor.busy and donor.pending and common_prefix(donor.cache + donor.pending, prompt) >= n:
                continue  # still computing the shared prefix
            else:
                slot.cache = []  # the donor went another way: compute it ourselves
            slot.pending = prompt[len(slot.cache):]
            slot.wait_for = None

    # --- one decode step -------------------------------------------------------------------

    def _step(self) -> None:
        self._resolve_waits()
        batch = self._batch
        entries: list[tuple[_Slot, int]] = []  # (slot, batch index) for outputs
        added: list[tuple[_Slot, list[int]]] = []
        n = 0

        def put(token: int, pos: int, seq: int, output: bool) -> None:
            nonlocal n
            batch.token[n] = token
            batch.pos[n] = pos
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = seq
            batch.logits[n] = output
            n += 1

        for slot in self._slots:
            if slot.busy and slot.next_token is not None:
                put(slot.next_token, len(slot.cache), slot.seq_id, True)
                entries.append((slot, n - 1))
                added.append((slot, [slot.next_token]))
        budget = self.n_batch - n
        for slot in self._slots:
            if budget <= 0:
                break
            if not slot.busy or not slot.pending or slot.wait_for is not None:
                continue
            take = min(budget, len(slot.pending))
            base = len(slot.cache)
            done = take == len(slot.pending)
            for j in range(take):
                put(slot.pending[j], base + j, slot.seq_id, done and j == take - 1)
            if done:
                entries.append((slot, n - 1))
            added.append((slot, slot.pending[:take]))
            budget -= take
        if n == 0:
            # Only waiting sequences: their donors are not busy any more, resolved next round.
            self._wake.wait(0.001)
            return

        batch.n_tokens = n
        rc = llama_cpp.llama_decode(self.model.ctx, batch)
        if rc != 0:
            log.error("llama_decode failed (%d) on a batch of %d tokens", rc, n)
            for slot, _ in added:
                if slot.busy:
                    self._finish(slot, "error", EngineError(f"llama_decode failed ({rc})"))
                self._forget(slot)
            return
        for slot, tokens in added:
            slot.cache.extend(tokens)
            if slot.pending:
                slot.pending = slot.pending[len(tokens):]
            else:
                slot.next_token = None
        for slot, index in entries:
            if slot.busy:
                try:
                    self._sample(slot, index)
                except Exception as exc:  # one sequence's failure is not its neighbours'
                    log.error("sampling a sequence failed: %s: %s", type(exc).__name__, exc)
                    self._fail(slot, EngineError(f"internal engine error: {type(exc).__name__}"))

    def _sample(self, slot: _Slot, index: int) -> None:
        handle = slot.handle
        assert handle is not None and handle.sampler is not None and slot.text is not None
        req = handle.request
        token = handle.sampler.sample(self.model.ctx, index)
        slot.n_generated += 1
        if req.logprobs is not None:
            logits = logits_at(self.model.ctx, index, self.model.n_vocab)
            chosen, top = token_logprobs(logits, token, req.logprobs)
            slot.held_logprobs.append(self._logprob_entry(token, chosen, top))
        if not req.ignore_eos and self.model.is_eog(token):
            slot.n_generated -= 1  # the end-of-generation token is not part of the completion
            if slot.held_logprobs:
                slot.held_logprobs.pop()
            self._finish(slot, "stop")
            return
        slot.held_tokens.append(token)
        text = slot.text.push(self.model.token_bytes(token, special=req.render_special))
        if text or slot.text.stopped:
            handle.emit(Delta(text, slot.held_tokens, slot.held_logprobs))
            slot.held_tokens = []
            slot.held_logprobs = []
        if slot.text.stopped:
            self._finish(slot, "stop")
        elif slot.n_generated >= req.max_tokens:
            self._finish(slot, "length")
        else:
            slot.next_token = token

    def _logprob_entry(self, token: int, chosen: float, top: list[tuple[int, float]]) -> TokenLogprob:
        raw = self.model.token_bytes(token)
        alts = []
        for tok, lp in top:
            b = self.model.token_bytes(tok)
            alts.append(TopLogprob(b.decode("utf-8", errors="replace"), lp, list(b)))
        return TokenLogprob(raw.decode("utf-8", errors="replace"), chosen, list(raw), alts)
