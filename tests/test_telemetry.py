"""Telemetry: /metrics in Prometheus format, the hardware sampler, and a reporter that survives ClearML failing."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.api.context import ServingContext
from app.clearml.session import AppTask
from app.telemetry.hardware import HardwareSampler, scalar_series
from app.telemetry.reporter import Reporter
from tests.conftest import API_KEY, ThreadedServer
from tests.fake_engine import FakeEngine


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = httpx.get(url + "/metrics", headers={"X-Api-Key": API_KEY})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_metrics_counters_match_the_requests_sent(fake_server: ThreadedServer, fake_engine: FakeEngine) -> None:
    client = openai.OpenAI(base_url=fake_server.url + "/v1", api_key=API_KEY, max_retries=0)
    usage = 0
    for _ in range(2):
        out = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        usage += out.usage.completion_tokens if out.usage else 0
    list(client.completions.create(model="m", prompt="x", stream=True, max_tokens=5))
    usage += 5
    httpx.get(fake_server.url + "/v1/models", headers={"X-Api-Key": "wrong"})
    m = scrape(fake_server.url)
    chat = (("endpoint", "/v1/chat/completions"), ("status", "200"))
    assert m[("llamacpp_requests_total", chat)] == 2
    assert m[("llamacpp_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))] == 1
    assert m[("llamacpp_requests_total", (("endpoint", "/v1/models"), ("status", "401")))] == 1
    assert m[("llamacpp_request_latency_seconds_count", (("endpoint", "/v1/chat/completions"),))] == 2
    assert m[("llamacpp_time_to_first_token_seconds_count", ())] == 3
    assert m[("llamacpp_completion_tokens_total", ())] == usage
    assert m[("llamacpp_in_flight_requests", ())] == 0
    assert m[("llamacpp_slots_total", ())] == fake_engine.parallel
    assert m[("llamacpp_memory_process_bytes", ())] > 10 * 1024**2
    assert ("llamacpp_cpu_system_percent", ()) in m
    assert not any(name.startswith("llamacpp_gpu_") for name, _ in m)  # no GPU here: no GPU series
    assert ("llamacpp_requests_total", (("endpoint", "/metrics"), ("status", "200"))) not in m


def test_metrics_needs_the_key_and_scrapes_are_not_activity(fake_server: ThreadedServer) -> None:
    assert httpx.get(fake_server.url + "/metrics").status_code == 401
    stats = fake_server.context.stats
    before = stats.idle_seconds()
    time.sleep(0.3)
    scrape(fake_server.url)
    httpx.get(fake_server.url + "/v1/models", headers={"X-Api-Key": "scanner"})  # a caller without the key
    assert stats.idle_seconds() >= before + 0.3


def test_hardware_sampler_reuses_a_fresh_sample() -> None:
    now = [0.0]
    sampler = HardwareSampler(max_age_s=1.0, clock=lambda: now[0])
    now[0] = 5.0
    first = sampler.latest()
    assert sampler.latest() is first
    now[0] = 6.5
    second = sampler.latest()
    assert second is not first and second.memory_total_gb > 0
    names = {(t, s) for t, s, _ in scalar_series(second)}
    # ClearML's own resource-monitor titles and series: the web UI's standard machine plots.
    machine = {"cpu_usage", "memory_used_gb", "memory_free_gb", "disk_free_percent", "network_tx_mbs",
               "network_rx_mbs", "io_read_mbs", "io_write_mbs"}
    assert names == {(":monitor:machine", series) for series in machine}  # no GPU here: no :monitor:gpu


def test_gpu_series_follow_clearml_monitor_names() -> None:
    from app.telemetry.hardware import GPUSample, HardwareSample

    sample = HardwareSample(at=0, cpu_system_pct=30, cpu_process_pct=50, memory_process_gb=0.5, memory_used_gb=6,
                            memory_total_gb=16, cpu_per_core_pct=[20.0, 40.0], net_rx_mbs=0.1, net_tx_mbs=0.2,
                            disk_read_mbs=1.5, disk_write_mbs=0.5, disk_free_pct=42.0,
                            gpus=[GPUSample(0, "gpu", 75.0, 2.0, 8.0, 61.0, power_w=120.5),
                                  GPUSample(1, "gpu", 5.0, 1.0, 8.0, 40.0)])
    rows = {(t, s): v for t, s, v in scalar_series(sample)}
    assert rows[(":monitor:machine", "memory_used_gb")] == 0.5  # this process, as ClearML's monitor reports it
    assert rows[(":monitor:machine", "memory_free_gb")] == 10
    assert rows[(":monitor:machine", "disk_free_percent")] == 42.0
    assert rows[(":monitor:gpu", "gpu_0_utilization")] == 75.0
    assert rows[(":monitor:gpu", "gpu_0_mem_usage")] == 25.0
    assert rows[(":monitor:gpu", "gpu_0_mem_free_gb")] == 6.0
    assert rows[(":monitor:gpu", "gpu_0_power_draw")] == 120.5
    assert rows[(":monitor:gpu", "gpu_1_temperature")] == 40.0
    assert (":monitor:gpu", "gpu_1_power_draw") not in rows  # not every GPU reports it


@dataclass
class FlakyLogger:
    failing: bool = True
    calls: int = 0
    reported: list[tuple[str, str]] = field(default_factory=list)

    def report_scalar(self, title: str, series: str, value: float, iteration: int) -> None:
        self.calls += 1
        if self.failing:
            raise ConnectionError("ClearML server unreachable")
        self.reported.append((title, series))


@dataclass
class FlakyTask:
    logger: FlakyLogger = field(default_factory=FlakyLogger)
    id: str = "flaky"

    def get_logger(self) -> FlakyLogger:
        return self.logger

    def set_user_properties(self, **props: Any) -> None:
        self.logger.calls += 1
        if self.logger.failing:
            raise ConnectionError("ClearML server unreachable")


def test_reporter_keeps_serving_and_trying_while_clearml_fails(fake_engine: FakeEngine,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    context = ServingContext.serving(fake_engine, API_KEY)
    task = FlakyTask()
    reporter = Reporter(context.stats, context.hardware, context.history, context.lifecycle,
                        context.lifecycle.note_activity, AppTask(task, offline=True, retry_base_s=0.05),
                        interval_s=0.05)
    with ThreadedServer(context) as server:
        reporter.start()
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
            for _ in range(3):
                assert client.completions.create(model="m", prompt="x", max_tokens=3).choices[0].text
                time.sleep(0.1)
            attempts = task.logger.calls
            assert attempts >= 3  # it kept trying
            task.logger.failing = False
            deadline = time.time() + 5
            while ("requests", "total") not in task.logger.reported and time.time() < deadline:
                time.sleep(0.05)
        finally:
            reporter.stop()
    assert ("requests", "total") in task.logger.reported
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "ClearML" in r.message]
    assert len(warnings) == 1  # one line per outage
    assert any("recovered" in r.message for r in caplog.records)


def test_an_outage_is_retried_with_exponential_backoff(caplog: pytest.LogCaptureFixture) -> None:
    import app.clearml.session as task_module

    clock = [1000.0]
    task = FlakyTask()
    app_task = AppTask(task, offline=True, retry_base_s=5.0)
    real_monotonic = task_module.time.monotonic
    task_module.time.monotonic = lambda: clock[0]  # type: ignore[assignment]
    try:
        attempts = []
        for second in range(0, 60):
            clock[0] = 1000.0 + second
            before = task.logger.calls
            app_task.report_scalar("requests", "total", 1, second)
            if task.logger.calls > before:
                attempts.append(second)
    finally:
        task_module.time.monotonic = real_monotonic  # type: ignore[assignment]
    assert attempts == [0, 5, 15, 35]  # waits of 5, 10, 20 s
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


class ReloadingOfflineTask:
    """The offline SDK's properties as the repository-detection thread sees them: `set_user_properties` merges into
    the in-memory task and saves it; `restore` puts back a copy read from the file before that save."""

    id = "offline"

    def __init__(self) -> None:
        self.properties: dict[str, str] = {}

    def set_user_properties(self, **props: Any) -> None:
        self.properties.update(props)

    def restore(self, stale: dict[str, str]) -> None:
        self.properties = dict(stale)


def test_offline_properties_survive_the_sdks_stale_reload() -> None:
    task = ReloadingOfflineTask()
    app_task = AppTask(task, offline=True)  # no outbox: each update is sent by its caller
    app_task.set_properties(status="loading", **{"API base": ""})
    stale = dict(task.properties)
    app_task.set_properties(**{"API base": "http://localhost:1/v1"})
    task.restore(stale)  # the SDK's thread saves the task it read before our update
    app_task.set_properties(status="stopped")
    assert task.properties == {"status": "stopped", "API base": "http://localhost:1/v1"}
