"""In-process request statistics and last activity, cheap on the hot path.

The HTTP layer calls `begin()` / `end()` per request; the reporter thread
takes `snapshot()`s. One short lock guards plain counters: no per-token work.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from app.telemetry.prometheus import RequestMetrics, endpoint_label


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@dataclass
class Snapshot:
    """What happened since the previous snapshot, plus running totals."""

    requests: int
    requests_total: int
    errors: int
    latencies_ms: list[float]
    ttft_ms: list[float]
    prompt_tokens: int
    completion_tokens: int
    interval_s: float
    in_flight: int
    idle_s: float
    by_endpoint: dict[tuple[str, int], int] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.interval_s if self.interval_s > 0 else 0.0


class RequestStats:
    """Counters since start and since the last snapshot, and the time of the last activity."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock or time.monotonic
        self.metrics = RequestMetrics()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._last_activity = self._clock()
        self._total = 0
        self._by_endpoint: Counter[tuple[str, int]] = Counter()
        self._reset_interval(self._clock())

    def _reset_interval(self, now: float) -> None:
        self._interval_start = now
        self._requests = 0
        self._errors = 0
        self._latencies: list[float] = []
        self._ttft: list[float] = []
        self._prompt_tokens = 0
        self._completion_tokens = 0

    def restart_idle_clock(self) -> None:
        """Idle time counts from now (the model became ready: loading is not idleness)."""
        with self._lock:
            self._last_activity = self._clock()

    def begin(self) -> float:
        with self._lock:
            self._in_flight += 1
            return self._clock()

    def end(self, endpoint: str, status: int, started: float, ttft_s: float | None = None,
            prompt_tokens: int = 0, completion_tokens: int = 0, active: bool = True) -> None:
        """One request ended; `active` says whether it was use (authenticated, reached a route)."""
        label = endpoint_label(endpoint)  # a closed set: random paths must not grow memory
        with self._lock:
            now = self._clock()
            self._in_flight -= 1
            if active:
                self._last_activity = now
            self._total += 1
            self._requests += 1
            if status >= 400:
                self._errors += 1
            self._by_endpoint[(label, status)] += 1
            self._latencies.append((now - started) * 1000.0)
            if ttft_s is not None:
                self._ttft.append(ttft_s * 1000.0)
            self._prompt_tokens += prompt_tokens
            self._completion_tokens += completion_tokens
            latency_s = now - started
        self.metrics.observe(label, status, latency_s, ttft_s, prompt_tokens, completion_tokens)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def idle_seconds(self) -> float:
        """Seconds since the last activity; 0 while any request is in flight."""
        with self._lock:
            if self._in_flight > 0:
                return 0.0
            return max(0.0, self._clock() - self._last_activity)

    def snapshot(self) -> Snapshot:
        with self._lock:
            now = self._clock()
            idle = 0.0 if self._in_flight else max(0.0, now - self._last_activity)
            snap = Snapshot(
                requests=self._requests, requests_total=self._total, errors=self._errors,
                latencies_ms=self._latencies, ttft_ms=self._ttft, prompt_tokens=self._prompt_tokens,
                completion_tokens=self._completion_tokens, interval_s=now - self._interval_start,
                in_flight=self._in_flight, idle_s=idle, by_endpoint=dict(self._by_endpoint),
            )
            self._reset_interval(now)
            return snap
