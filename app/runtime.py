"""The state shared by the HTTP layer, the lifecycle and the reporter, built once at start-up."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Optional

from app.engine.types import EngineProtocol
from app.telemetry.hardware import HardwareSampler
from app.telemetry.history import ConsoleTail, History
from app.telemetry.stats import RequestStats


@dataclass
class Runtime:
    """Handed to `create_app` and to the reporter; nothing reaches it through a global."""

    api_key: str
    model_id: str
    stats: RequestStats = field(default_factory=RequestStats)
    hardware: HardwareSampler = field(default_factory=HardwareSampler)
    history: History = field(default_factory=History)
    console: ConsoleTail = field(default_factory=ConsoleTail)
    properties: dict[str, str] = field(default_factory=dict)  # App URL, API base, test command, ...
    activity: str = "idle"  # active | idle, as the reporter last saw it
    engine: Optional[EngineProtocol] = None
    state: str = "loading"  # loading | ready | failed | stopping
    failure: Optional[str] = None
    shutdown_reason: Optional[str] = None
    stop_requested: threading.Event = field(default_factory=threading.Event)

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.engine is not None

    def display_status(self) -> str:
        """What the user sees: loading, active, idle, stopped (or failed)."""
        if self.state == "ready":
            return self.activity
        return {"loading": "loading", "failed": "failed", "stopping": "stopped"}.get(self.state, self.state)

    def request_stop(self, reason: str) -> None:
        """Ask the server to drain and exit; the first reason given wins."""
        if self.shutdown_reason is None:
            self.shutdown_reason = reason
        self.stop_requested.set()
