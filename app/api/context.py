"""What the HTTP layer is handed at start-up: the app's lifecycle, its key, and the telemetry it feeds and shows."""

from __future__ import annotations

from dataclasses import dataclass, field

from app.endpoint import EndpointInfo
from app.engine.types import EngineProtocol
from app.lifecycle import Lifecycle
from app.telemetry.hardware import HardwareSampler
from app.telemetry.history import ConsoleTail, History
from app.telemetry.stats import RequestStats


@dataclass
class ServingContext:
    """Built once by `main` (or a test); routes read it from `app.state.context`, nothing reaches it globally."""

    lifecycle: Lifecycle
    api_key: str
    model_id: str
    stats: RequestStats = field(default_factory=RequestStats)
    hardware: HardwareSampler = field(default_factory=HardwareSampler)
    history: History = field(default_factory=History)
    console: ConsoleTail = field(default_factory=ConsoleTail)
    endpoint: EndpointInfo = field(default_factory=EndpointInfo)  # set by main once the port is bound
    cors_origins: tuple[str, ...] = ("*",)  # browser origins allowed to call the API; () = CORS off

    @classmethod
    def serving(cls, engine: EngineProtocol, api_key: str) -> ServingContext:
        """A context whose model is already loaded (tests, benchmarks)."""
        lifecycle = Lifecycle()
        lifecycle.ready(engine)
        return cls(lifecycle, api_key, engine.model_id)
