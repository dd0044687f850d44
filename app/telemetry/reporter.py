"""The reporter thread: status, last action and request scalars to the task; the idle watchdog.

It sleeps on `Event.wait`, so stopping never waits a full interval. The
watchdog looks every second; the task hears from it every Last Action Report
Interval. A failing ClearML is the task wrapper's problem, logged once, and
never stops the loop.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from typing import Callable, Optional, Protocol

from app.runtime import Runtime
from app.telemetry.hardware import HardwareSample, scalar_series
from app.telemetry.stats import Snapshot, percentile

log = logging.getLogger(__name__)

WATCHDOG_PERIOD_S = 1.0


class TaskSink(Protocol):
    def set_properties(self, **properties: object) -> bool: ...
    def report_scalar(self, title: str, series: str, value: float, iteration: int) -> bool: ...


class EndpointSink(Protocol):
    def report(self, requests_total: int, requests_per_min: float, latency_ms: float) -> None: ...


class Reporter:
    """Owns one thread; `start()` and `stop()` are its whole lifecycle."""

    def __init__(self, runtime: Runtime, sink: Optional[TaskSink], interval_s: float, idle_limit_s: float,
                 clock: Callable[[], float] = time.monotonic, endpoint: Optional[EndpointSink] = None) -> None:
        self.runtime = runtime
        self.sink = sink
        self.endpoint = endpoint
        self.interval_s = interval_s
        self.idle_limit_s = idle_limit_s
        self._clock = clock
        self._started = clock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reporter", daemon=True)
        self.status: Optional[str] = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def iteration(self) -> int:
        """The scalars' x-axis: whole seconds since start."""
        return int(self._clock() - self._started)

    def _run(self) -> None:
        next_report = self._clock() + self.interval_s
        while not self._stop.wait(min(WATCHDOG_PERIOD_S, max(0.0, next_report - self._clock()))):
            try:
                if self._clock() >= next_report:
                    next_report = self._clock() + self.interval_s
                    self.report()
                self.watch_idle()
            except Exception:  # the reporter must outlive any one bad report
                log.exception("reporter tick failed")

    # --- watchdog ------------------------------------------------------------------

    def watch_idle(self) -> None:
        if self.idle_limit_s <= 0 or not self.runtime.ready or self.runtime.stop_requested.is_set():
            return  # off, not serving yet, or already on the way out (say it once)
        idle = self.runtime.stats.idle_seconds()
        if idle >= self.idle_limit_s:
            log.info("idle for %.0f s (limit %.0f s): shutting down", idle, self.idle_limit_s)
            self.runtime.request_stop(f"idle for {idle:.0f} s")

    # --- reports ---------------------------------------------------------------------

    def report(self) -> None:
        snap = self.runtime.stats.snapshot()
        if self.runtime.ready:
            self.set_status("active" if snap.requests or snap.in_flight else "idle")
        hardware = self.runtime.hardware.latest()
        engine = self.runtime.engine
        series = request_series(snap, engine) + scalar_series(hardware)
        self.runtime.history.append(history_point(dict(((t, s), v) for t, s, v in series), hardware))
        if self.endpoint is not None:
            per_min = snap.requests * 60.0 / snap.interval_s if snap.interval_s > 0 else 0.0
            mean_ms = sum(snap.latencies_ms) / len(snap.latencies_ms) if snap.latencies_ms else 0.0
            self.endpoint.report(snap.requests_total, per_min, mean_ms)
        if self.sink is None:
            return
        it = self.iteration()
        last_action = datetime.datetime.now() - datetime.timedelta(seconds=snap.idle_s)
        self.sink.set_properties(**{"idle time (s)": f"{snap.idle_s:.0f}",
                                    "last action": last_action.strftime("%Y-%m-%d %H:%M:%S")})
        for title, name, value in series:
            self.sink.report_scalar(title, name, value, it)

    def set_status(self, status: str) -> None:
        if status == self.status:
            return
        self.status = status
        self.runtime.activity = status
        log.info("status: %s", status)
        if self.sink is not None:
            self.sink.set_properties(status=status)


def request_series(snap: Snapshot, engine: object) -> list[tuple[str, str, float]]:
    """(title, series, value) for the request side of one report; latency only when there were requests."""
    rows = [
        ("last action", "seconds since", snap.idle_s),
        ("requests", "per interval", snap.requests),
        ("requests", "total", snap.requests_total),
        ("requests", "in flight", snap.in_flight),
        ("tokens", "per second", snap.tokens_per_second),
        ("tokens", "prompt per interval", snap.prompt_tokens),
        ("tokens", "generated per interval", snap.completion_tokens),
    ]
    if engine is not None:
        rows.append(("requests", "queued", getattr(engine, "queue_depth", 0)))
    if snap.latencies_ms:
        rows += [("latency ms", "p50", percentile(snap.latencies_ms, 0.5)),
                 ("latency ms", "p95", percentile(snap.latencies_ms, 0.95))]
    if snap.ttft_ms:
        rows += [("latency ms", "ttft p50", percentile(snap.ttft_ms, 0.5)),
                 ("latency ms", "ttft p95", percentile(snap.ttft_ms, 0.95))]
    return rows


def history_point(values: dict[tuple[str, str], float], hw: HardwareSample) -> dict[str, object]:
    """One dashboard point from the values this report sent anyway."""
    return {
        "t": time.time(),
        "requests": values[("requests", "per interval")],
        "latency_p50": values.get(("latency ms", "p50")),
        "latency_p95": values.get(("latency ms", "p95")),
        "tokens_per_s": values[("tokens", "per second")],
        "in_flight": values[("requests", "in flight")],
        "queued": values.get(("requests", "queued"), 0),
        "cpu": values[("cpu", "system %")],
        "memory_gb": values[("memory", "process GB")],
        "net_rx": values[("network", "rx MB/s")], "net_tx": values[("network", "tx MB/s")],
        "disk_read": values[("disk", "read MB/s")], "disk_write": values[("disk", "write MB/s")],
        "gpus": [{"index": g.index, "util": g.utilization_pct, "mem_gb": g.memory_used_gb,
                  "temp": g.temperature_c} for g in hw.gpus],
    }
