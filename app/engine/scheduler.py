"""Continuous batching: one thread owns the llama context and decodes every active sequence together.

Each request gets a sequence (slot) of the unified KV cache, and any one request may use the whole of it:
admission is by free cells (a request's prompt is reserved when it is admitted), not by n_ctx / parallel. When
generation fills the cache, the most recently admitted sequence is preempted: its cells are freed, its tokens
and sampler kept, and it is recomputed (prefix reuse included) when room returns, as vLLM's recompute preemption
does; nothing is lost and no stream is cut. Every step the
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
import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import llama_cpp

from app.engine.cells import CellLedger
from app.engine.model import LlamaModel
from app.engine.sampling import SamplerChain, logits_at, token_logprobs
from app.engine.text import TextStream
from app.engine.types import (
    ContextLengthError,
    Delta,
    EngineError,
    Finish,
    GenerationRequest,
    Outbox,
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
# Cells kept free per generating sequence when admitting new work, so running streams do not stall at once.
GROWTH_RESERVE = 16


def common_prefix(a: list[int], b: list[int], chunk: int = 256) -> int:
    """How many leading tokens `a` and `b` share (compared a chunk at a time: long caches are common)."""
    n = min(len(a), len(b))
    i = 0
    while i + chunk <= n and a[i:i + chunk] == b[i:i + chunk]:
        i += chunk
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _Parked:
    """A preempted request: everything but its cells, to be recomputed when room returns."""

    handle: RequestHandle
    tokens: list[int]  # prompt and generated tokens whose KV must be rebuilt
    resume_token: int | None  # the sampled token not yet decoded (None: it was still reading its prompt)
    text: TextStream
    n_prompt: int
    n_cached: int
    n_generated: int
    held_logprobs: list[TokenLogprob]
    held_tokens: list[int]


@dataclass
class _Slot:
    seq_id: int
    cache: list[int] = field(default_factory=list)  # tokens whose KV this sequence holds, positions 0..n-1
    cells: list[int] = field(default_factory=list)  # their cells (CellLedger ids), parallel to `cache`
    tokens: list[int] = field(default_factory=list)  # what the sequence is reading: its prompt, or a parked one's
    admitted: int = 0  # admission order: the newest is preempted first
    resume_token: int | None = None  # a resumed sequence decodes this once its tokens are rebuilt
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
        self.n_ctx = model.n_ctx
        self.n_ctx_seq = model.n_ctx  # any one request may use the whole cache
        self.cells = CellLedger(model.n_ctx)
        self.preemptions = 0  # sequences preempted to free cells (each recomputed later)
        self._admissions = itertools.count(1)
        self._slots = [_Slot(i) for i in range(parallel)]
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._parked: collections.deque[_Parked] = collections.deque()
        self._jobs: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._outbox = Outbox()  # one wake-up of the event loop per step, whatever the number of streams
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
        return len(self._waiting) + len(self._parked)

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
                f"This server's context is {self.n_ctx_seq} tokens; the request needs {n_prompt} prompt + "
                f"{request.max_tokens} completion tokens. Shorten the prompt or lower max_tokens."
            )
        handle = RequestHandle(request, loop, self._outbox)
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
        self._outbox.bind()
        while not self._stop.is_set():
            try:
                if self._abort is not None:
                    self._fail_everything(self._abort)
                self._run_jobs()
                self._drop_cancelled()
                self._admit()
                if not any(s.busy for s in self._slots):
                    self._outbox.flush()
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                self._step()
            except Exception as exc:  # never let one bad step kill the engine; fail only what it touched
                log.error("engine step failed: %s: %s", type(exc).__name__, exc,
                          exc_info=log.isEnabledFor(logging.DEBUG))
                self._fail_all(EngineError(f"internal engine error: {type(exc).__name__}"))
            finally:
                self._outbox.flush()
        self._fail_everything(ShuttingDownError("the server is shutting down"))
        self._outbox.flush()

    def _fail_everything(self, error: EngineError) -> None:
        self._fail_all(error)
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        parked, self._parked = list(self._parked), collections.deque()
        waiting = [p.handle for p in parked] + waiting
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
        self.cells.truncate(slot.cells, 0)

    def _drop_cancelled(self) -> None:
        for slot in self._slots:
            if slot.busy and slot.handle is not None and slot.handle.cancelled:
                self._finish(slot, "cancelled")
        with self._lock:
            cancelled = [h for h in self._waiting if h.cancelled]
            for h in cancelled:
                self._waiting.remove(h)
        gone = [p for p in self._parked if p.handle.cancelled]
        for p in gone:
            self._parked.remove(p)
        cancelled += [p.handle for p in gone]
        for h in cancelled:
            self._emit_finish(h, Finish("cancelled", len(h.request.prompt_tokens), 0, 0))

    # --- admission and prefix reuse ------------------------------------------------------

    def _admit(self) -> None:
        """Parked (preempted) requests first, then the queue, in order, while a sequence is free and the cache
        has room for the next one's prompt; the head waits (nothing overtakes it) until room returns."""
        while True:
            free = [s for s in self._slots if not s.busy and not self._is_donor(s)]
            if not free:
                return
            parked = self._parked[0] if self._parked else None
            if parked is not None:
                tokens = parked.tokens
            else:
                with self._lock:
                    if not self._waiting:
                        return
                    tokens = self._waiting[0].request.prompt_tokens
            if not self._make_room(tokens, free):
                return
            if parked is not None:
                self._parked.popleft()
                handle = parked.handle
            else:
                with self._lock:
                    handle = self._waiting.popleft()
            try:
                self._assign(handle, free, parked)
            except Exception as exc:  # this request's problem only: it ends, its place is released
                if not isinstance(exc, EngineError):
                    log.error("admitting a request failed: %s: %s", type(exc).__name__, exc)
                    exc = EngineError(f"internal engine error: {type(exc).__name__}")
                for slot in free:
                    if slot.handle is handle:
                        slot.handle = None
                        self._forget(slot)
                self._emit_finish(handle, Finish("error", len(handle.request.prompt_tokens), 0, 0, exc))

    def _reserved(self) -> int:
        """Cells promised to admitted sequences and not yet decoded: the rest of their prompts, and the prompts
        of those waiting for a donor's prefix."""
        total = 0
        for s in self._slots:
            if s.busy:
                total += len(s.tokens) - s.wait_for[1] if s.wait_for is not None else len(s.pending)
        return total

    def _room(self) -> int:
        return self.cells.free - self._reserved()

    def _make_room(self, tokens: list[int], free: list[_Slot]) -> bool:
        """Whether `tokens` may be admitted now, evicting idle caches (least useful first) if that makes room.
        With nothing running the request is always admitted: submit checked that it fits the whole cache."""
        prefix = {s.seq_id: common_prefix(s.cache, tokens) for s in self._slots}
        best = max(prefix.values(), default=0)
        generating = sum(1 for s in self._slots if s.busy)
        need = len(tokens) - best + 1 + GROWTH_RESERVE * generating
        if self._room() >= need:
            return True
        idle = sorted((s for s in free if s.cache), key=lambda s: prefix[s.seq_id])
        for slot in idle:
            if self._room() >= need:
                break
            if prefix[slot.seq_id] == best and best > 0:
                continue  # the prefix this request will reuse
            self._forget(slot)
        if self._room() >= need:
            return True
        if generating == 0:
            for slot in idle:
                self._forget(slot)
            return True
        return False

    def _is_donor(self, slot: _Slot) -> bool:
        return any(s.wait_for is not None and s.wait_for[0] is slot for s in self._slots)

    def _assign(self, handle: RequestHandle, free: list[_Slot], parked: _Parked | None = None) -> None:
        req = handle.request
        prompt = parked.tokens if parked is not None else req.prompt_tokens
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
            slot.cells = self.cells.share(donor.cells, donor_n)
            reused = donor_n
        else:
            if not llama_cpp.llama_memory_seq_rm(self.model.memory, slot.seq_id, own_n, -1):
                self._forget(slot)
                own_n = 0
            slot.cache = slot.cache[:own_n]
            self.cells.truncate(slot.cells, own_n)
            reused = own_n

        slot.handle = handle
        slot.tokens = prompt
        slot.admitted = next(self._admissions)
        slot.pending = prompt[len(slot.cache):] if wait_for is None else []
        slot.wait_for = wait_for
        slot.next_token = None
        if parked is None:
            slot.text = TextStream(req.stop)
            slot.resume_token = None
            slot.n_prompt = len(prompt)
            slot.n_cached = reused
            slot.n_generated = 0
            slot.held_logprobs = []
            slot.held_tokens = []
        else:  # where it was preempted: only its cells were rebuilt
            slot.text = parked.text
            slot.resume_token = parked.resume_token
            slot.n_prompt = parked.n_prompt
            slot.n_cached = parked.n_cached
            slot.n_generated = parked.n_generated
            slot.held_logprobs = parked.held_logprobs
            slot.held_tokens = parked.held_tokens

    # --- preemption ---------------------------------------------------------------------------

    def _preempt(self, slot: _Slot) -> None:
        """Free a running sequence's cells and park it, tokens and sampler kept, at the head of the line."""
        handle = slot.handle
        assert handle is not None and slot.text is not None
        reading = slot.wait_for is not None or bool(slot.pending)  # still reading its tokens
        tokens = list(slot.tokens) if slot.wait_for is not None else slot.cache + slot.pending
        # A sequence still reading has sampled nothing new: a rebuilt one keeps the token it had sampled before.
        resume = slot.resume_token if reading else slot.next_token
        self._parked.appendleft(_Parked(handle, tokens, resume, slot.text, slot.n_prompt, slot.n_cached,
                                        slot.n_generated, slot.held_logprobs, slot.held_tokens))
        slot.handle = None
        slot.text = None
        slot.next_token = None
        slot.resume_token = None
        slot.pending = []
        slot.wait_for = None
        slot.held_logprobs = []
        slot.held_tokens = []
        self._forget(slot)
        self.preemptions += 1
        log.info("cache full: preempted a sequence of %d tokens (to be recomputed; %d preemptions so far)",
                 len(tokens), self.preemptions)

    def _free_some(self) -> bool:
        """Free some cells whatever our ledger says (llama.cpp knows better): an idle cache, else the newest
        running sequence but the last. False when there is nothing left to free."""
        idle = [s for s in self._slots if not s.busy and s.cache and not self._is_donor(s)]
        if idle:
            self._forget(min(idle, key=lambda s: s.admitted))
            return True
        running = [s for s in self._slots if s.busy]
        if len(running) > 1:
            self._preempt(max(running, key=lambda s: s.admitted))
            return True
        return False

    def _free_cells(self, need: int) -> bool:
        """Make `need` cells free for the next step (see _free_some); False when nothing more can be freed."""
        while self._room() < need:
            if not self._free_some():
                return False
        return True

    def _resolve_waits(self) -> None:
        for slot in self._slots:
            if slot.wait_for is None or slot.handle is None:
                continue
            donor, n = slot.wait_for
            prompt = slot.tokens
            if len(donor.cache) >= n and donor.cache[:n] == prompt[:n]:
                llama_cpp.llama_memory_seq_cp(self.model.memory, donor.seq_id, slot.seq_id, 0, n)
                slot.cache = prompt[:n]
                slot.cells = self.cells.share(donor.cells, n)
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
        growing = sum(1 for s in self._slots if s.busy and s.next_token is not None)
        if growing and not self._free_cells(growing):
            # One sequence left and no cell for its next token: cannot happen for a request that passed submit
            # (prompt + max_tokens fit the cache) unless llama.cpp holds cells we do not know of.
            for slot in self._slots:
                if slot.busy and slot.next_token is not None:
                    self._fail(slot, EngineError("the context is full"))
            return
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
            # The prompt's last token gives the logits to sample; a rebuilt sequence has its token already.
            done = take == len(slot.pending) and slot.resume_token is None
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
        if rc == 1 and self._free_some():
            # llama.cpp found no room for the batch and applied nothing: cells were freed, build the step again.
            log.info("llama.cpp found no KV room for a batch of %d tokens; cells freed, retrying", n)
            return
        if rc != 0:
            log.error("llama_decode failed (%d) on a batch of %d tokens", rc, n)
            for slot, _ in added:
                if slot.busy:
                    self._finish(slot, "error", EngineError(f"llama_decode failed ({rc})"))
                self._forget(slot)
            return
        for slot, tokens in added:
            slot.cache.extend(tokens)
            self.cells.grow(slot.cells, len(tokens))
            if slot.pending:
                slot.pending = slot.pending[len(tokens):]
                if not slot.pending and slot.resume_token is not None:
                    # Rebuilt after a preemption: go on with the token it had sampled, sample nothing here.
                    slot.next_token, slot.resume_token = slot.resume_token, None
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
