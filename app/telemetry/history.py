"""The last hour of telemetry and console lines, for the dashboard (no sampler of its own).

The reporter appends one point per report from the snapshot and hardware sample it has already taken; a
logging handler keeps the tail of the console.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any

HOUR_S = 3600.0
MAX_POINTS = 3600  # one a second at most
LOG_LINES = 200


class History:
    """Thread-safe ring of telemetry points, trimmed to the last hour."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._points: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_POINTS)

    def append(self, point: dict[str, Any]) -> None:
        with self._lock:
            self._points.append(point)
            cutoff = point["t"] - HOUR_S
            while self._points and self._points[0]["t"] < cutoff:
                self._points.popleft()

    def points(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._points)


class ConsoleTail(logging.Handler):
    """Keeps the last lines of the app's log (formatted as the console shows them)."""

    def __init__(self, lines: int = LOG_LINES) -> None:
        super().__init__(level=logging.INFO)
        self._lines: collections.deque[tuple[float, str]] = collections.deque(maxlen=lines)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append((record.created, self.format(record)))
        except Exception:  # a log line must never break the caller
            pass

    def tail(self, since: float = 0.0) -> list[str]:
        return [line for created, line in list(self._lines) if created > since]
