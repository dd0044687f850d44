"""One object, one enum state: every transition of the app's life happens here.

loading → idle ⇄ active → stopping → stopped, or → failed from anywhere but stopped. The loader thread says
`ready`, the reporter reports activity, signals, the idle watchdog and the UI abort `request_stop`, the server
says `begin_stopping`, and `main` ends it with `finish`. Each change is logged once ("status: …") and handed to
the listeners (the task's status property). Telemetry reads it through narrow protocols; nothing else writes it.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from typing import Any

from app.engine.types import EngineProtocol

log = logging.getLogger("app")


class State(enum.Enum):
    LOADING = "loading"
    IDLE = "idle"
    ACTIVE = "active"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def shown(self) -> str:
        """What the user sees: a stopping app already reads as stopped (it takes no new work)."""
        return "stopped" if self is State.STOPPING else self.value


_ALLOWED: dict[State, frozenset[State]] = {
    State.LOADING: frozenset({State.IDLE, State.STOPPING, State.FAILED}),
    State.IDLE: frozenset({State.ACTIVE, State.STOPPING, State.FAILED}),
    State.ACTIVE: frozenset({State.IDLE, State.STOPPING, State.FAILED}),
    State.STOPPING: frozenset({State.STOPPED, State.FAILED}),
    State.STOPPED: frozenset(),
    State.FAILED: frozenset(),
}

Listener = Callable[[State], Any]


class Lifecycle:
    """Thread-safe owner of the state, the loaded engine and the reason the app stops."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = State.LOADING
        self._engine: EngineProtocol | None = None
        self._listeners: list[Listener] = []
        self.failure: str | None = None
        self.shutdown_reason: str | None = None
        self.stop_requested = threading.Event()

    # --- reading ------------------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def engine(self) -> EngineProtocol | None:
        return self._engine

    @property
    def serving(self) -> bool:
        """Loaded and taking requests."""
        return self._state in (State.IDLE, State.ACTIVE) and self._engine is not None

    @property
    def stopping(self) -> bool:
        return self._state is State.STOPPING

    def subscribe(self, listener: Listener) -> None:
        """Call `listener(state)` after every change (from the thread that made it)."""
        self._listeners.append(listener)

    # --- transitions --------------------------------------------------------------------------------------

    def _move(self, new: State, detail: str = "") -> bool:
        with self._lock:
            if new is self._state or new not in _ALLOWED[self._state]:
                return False
            self._state = new
        log.info("status: %s%s", new.value, detail)
        for listener in self._listeners:
            try:
                listener(new)
            except Exception:  # a listener (ClearML) must never break a transition
                log.warning("status listener failed", exc_info=log.isEnabledFor(logging.DEBUG))
        return True

    def ready(self, engine: EngineProtocol) -> bool:
        """The model is loaded: serve it. False (the caller closes the engine) when a stop came first."""
        self._engine = engine
        if self.stop_requested.is_set():
            return False
        return self._move(State.IDLE)

    def note_activity(self, active: bool) -> None:
        """The reporter's verdict for the last interval."""
        if self.serving:
            self._move(State.ACTIVE if active else State.IDLE)

    def request_stop(self, reason: str) -> None:
        """Ask the server to drain and exit; the first reason given wins."""
        with self._lock:
            if self.shutdown_reason is None:
                self.shutdown_reason = reason
        self.stop_requested.set()

    def begin_stopping(self) -> None:
        """The server starts draining: new requests get 503 from here on."""
        self.request_stop("server stopped")
        self._move(State.STOPPING, f" ({self.shutdown_reason})")

    def fail(self, cause: str) -> None:
        """Record the cause and stop; `main` reports it once and fails the task."""
        with self._lock:
            if self.failure is None:
                self.failure = cause
        self.request_stop("failed")
        self._move(State.FAILED)

    def finish(self) -> State:
        """The server has returned: stopped, unless the run failed."""
        if self._state is not State.FAILED:
            self._move(State.STOPPING, f" ({self.shutdown_reason})")
            self._move(State.STOPPED, f" ({self.shutdown_reason or 'server stopped'})")
        return self._state
