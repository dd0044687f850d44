"""The narrow read-only views telemetry has of the app: never the object that owns them."""

from __future__ import annotations

from typing import Protocol


class EngineLoad(Protocol):
    """What telemetry reads of the engine."""

    parallel: int
    n_ctx: int

    @property
    def queue_depth(self) -> int: ...
    @property
    def active(self) -> int: ...
    @property
    def kv_cells_used(self) -> int: ...
    @property
    def preemptions(self) -> int: ...


class ServingView(Protocol):
    """What telemetry reads of the app's state (the lifecycle provides it)."""

    @property
    def serving(self) -> bool: ...
    @property
    def engine(self) -> EngineLoad | None: ...
