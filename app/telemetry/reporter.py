"""Two threads: the reporter (scalars, properties and Model Endpoints reports) and the idle watchdog.

Each sleeps on `Event.wait`, so stopping never waits a full interval. The watchdog runs on its own one-second
clock and touches nothing but in-process counters, so a slow or unreachable ClearML (whose calls the reporter
makes, and which the SDK retries for minutes) can never keep an idle app running. Both read the app through
narrow protocols and act through callbacks handed over by `main`; neither knows the object that owns them.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from app.telemetry.hardware import HardwareSample, HardwareSampler, scalar_series
from app.telemetry.history import History
from app.telemetry.stats import RequestStats, Snapshot, percentile
from app.telemetry.views import EngineLoad, ServingView

log = logging.getLogger(__name__)

WATCHDOG_PERIOD_S = 1.0


class TaskSink(Protocol):
    def set_properties(self, **properties: object) -> bool: ...
    def report_scalar(self, title: str, series: str, value: float, iteration: int) -> bool: ...


class EndpointSink(Protocol):
    def report(self, requests_total: int, requests_per_min: float, latency_ms: float,
               hardware: HardwareSample) -> None: ...


@dataclass(frozen=True)
class Scalar:
    title: str
    series: str
    value: float


class StoppableThread:
    """A daemon thread that runs `tick` every `period()` seconds until `stop()`; a failing tick is logged once
    per run of failures and never ends the loop."""

    def __init__(self, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._failing = False

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def period(self) -> float:
        raise NotImplementedError

    def tick(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self.period()):
            try:
                self.tick()
                self._failing = False
            except Exception:
                if not self._failing:
                    log.exception("%s tick failed", self._thread.name)
                self._failing = True


class IdleWatchdog(StoppableThread):
    """Trips `on_idle` once when no request has been served for `limit_s` (0 = never)."""

    def __init__(self, stats: RequestStats, view: ServingView, limit_s: float,
                 on_idle: Callable[[str], None]) -> None:
        super().__init__("idle-watchdog")
        self.stats = stats
        self.view = view
        self.limit_s = limit_s
        self.on_idle = on_idle
        self.tripped = False

    def period(self) -> float:
        return WATCHDOG_PERIOD_S

    def tick(self) -> None:
        if self.limit_s <= 0 or self.tripped or not self.view.serving:
            return  # off, already on the way out, or not serving yet (loading is not idleness)
        idle = self.stats.idle_seconds()
        if idle >= self.limit_s:
            self.tripped = True
            log.info("idle for %.0f s (limit %.0f s): shutting down", idle, self.limit_s)
            self.on_idle(f"idle for {idle:.0f} s")


class Reporter(StoppableThread):
    """Every `interval_s`: activity to the lifecycle, a dashboard point, and the task's properties and scalars."""

    def __init__(self, stats: RequestStats, hardware: HardwareSampler, history: History, view: ServingView,
                 on_activity: Callable[[bool], None], sink: TaskSink | None, interval_s: float,
                 clock: Callable[[], float] = time.monotonic, endpoint: EndpointSink | None = None) -> None:
        super().__init__("reporter")
        self.stats = stats
        self.hardware = hardware
        self.history = history
        self.view = view
        self.on_activity = on_activity
        self.sink = sink
        self.endpoint = endpoint
        self.interval_s = interval_s
        self._clock = clock
        self._started = clock()

    def period(self) -> float:
        return self.interval_s

    def tick(self) -> None:
        self.report()

    def iteration(self) -> int:
        """The scalars' x-axis: whole seconds since start."""
        return int(self._clock() - self._started)

    def report(self) -> None:
        snap = self.stats.snapshot()
        if self.view.serving:
            self.on_activity(bool(snap.requests or snap.in_flight))
        hardware = self.hardware.latest()
        queued = self.view.engine.queue_depth if self.view.engine is not None else None
        latency = Latency.of(snap)
        self.history.append(history_point(snap, latency, queued, hardware))
        if self.endpoint is not None:
            per_min = snap.requests * 60.0 / snap.interval_s if snap.interval_s > 0 else 0.0
            mean_ms = sum(snap.latencies_ms) / len(snap.latencies_ms) if snap.latencies_ms else 0.0
            self.endpoint.report(snap.requests_total, per_min, mean_ms, hardware)
        if self.sink is None:
            return
        it = self.iteration()
        last_action = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=snap.idle_s)
        self.sink.set_properties(**{"idle time (s)": f"{snap.idle_s:.0f}",
                                    "last action": last_action.isoformat(timespec="seconds")})
        rows = request_series(snap, latency, queued) + engine_series(self.view.engine)
        for row in rows + [Scalar(*row) for row in scalar_series(hardware)]:
            self.sink.report_scalar(row.title, row.series, row.value, it)


@dataclass(frozen=True)
class Latency:
    """One interval's latency percentiles (ms), computed once for the scalars and the dashboard."""

    p50: float | None
    p95: float | None
    ttft_p50: float | None
    ttft_p95: float | None

    @classmethod
    def of(cls, snap: Snapshot) -> Latency:
        lat, ttft = snap.latencies_ms, snap.ttft_ms
        return cls(percentile(lat, 0.5) if lat else None, percentile(lat, 0.95) if lat else None,
                   percentile(ttft, 0.5) if ttft else None, percentile(ttft, 0.95) if ttft else None)


def request_series(snap: Snapshot, latency: Latency, queued: int | None) -> list[Scalar]:
    """The request side of one report; latency only when there were requests."""
    rows = [
        Scalar("last action", "seconds since", snap.idle_s),
        Scalar("requests", "per interval", snap.requests),
        Scalar("requests", "total", snap.requests_total),
        Scalar("requests", "in flight", snap.in_flight),
        Scalar("tokens", "per second", snap.tokens_per_second),
        Scalar("tokens", "prompt per interval", snap.prompt_tokens),
        Scalar("tokens", "generated per interval", snap.completion_tokens),
    ]
    if queued is not None:
        rows.append(Scalar("requests", "queued", queued))
    for series, value in (("p50", latency.p50), ("p95", latency.p95), ("ttft p50", latency.ttft_p50),
                          ("ttft p95", latency.ttft_p95)):
        if value is not None:
            rows.append(Scalar("latency ms", series, value))
    return rows


def engine_series(engine: EngineLoad | None) -> list[Scalar]:
    """The KV cache's fill and the preemptions so far (sequences recomputed because the cache was full)."""
    if engine is None:
        return []
    return [Scalar("kv cache", "cells used", engine.kv_cells_used), Scalar("kv cache", "cells", engine.n_ctx),
            Scalar("kv cache", "preemptions", engine.preemptions)]


def history_point(snap: Snapshot, latency: Latency, queued: int | None, hw: HardwareSample) -> dict[str, object]:
    """One dashboard point from the snapshot and sample this report took anyway."""
    return {
        "t": time.time(),
        "requests": snap.requests,
        "latency_p50": latency.p50,
        "latency_p95": latency.p95,
        "tokens_per_s": snap.tokens_per_second,
        "in_flight": snap.in_flight,
        "queued": queued or 0,
        "cpu": hw.cpu_system_pct,
        "memory_gb": hw.memory_process_gb,
        "net_rx": hw.net_rx_mbs, "net_tx": hw.net_tx_mbs,
        "disk_read": hw.disk_read_mbs, "disk_write": hw.disk_write_mbs,
        "gpus": [{"index": g.index, "util": g.utilization_pct, "mem_gb": g.memory_used_gb,
                  "temp": g.temperature_c} for g in hw.gpus],
    }
