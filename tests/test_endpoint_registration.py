"""Model Endpoints registration: payloads per the server's serving schema (API 2.31), skips and failures.

The SDK has no schema for the `serving` service, so the task's session is a
recording stand-in here; the required fields and types below are the
server's (serving.conf: register_container, container_status_report,
unregister_container).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import pytest

from app.clearml.endpoint import EndpointRegistration, model_references
from app.clearml.session import AppTask
from app.telemetry.hardware import GPUSample, HardwareSample

REQUIRED = {"container_id", "endpoint_name", "model_name"}


@dataclass
class Response:
    ok: bool = True
    status_code: int = 200


@dataclass
class RecordingSession:
    api_ok: bool = True
    fail: bool = False
    calls: list[tuple[str, str, str, dict[str, Any]]] = field(default_factory=list)

    def check_min_api_server_version(self, version: str) -> bool:
        return self.api_ok

    def send_request(self, service: str, action: str, version: str, method: str, json: dict[str, Any]) -> Response:
        self.calls.append((service, action, version, json))
        if self.fail:
            raise ConnectionError("server unreachable")
        return Response()


@dataclass
class StandInTask:
    session: RecordingSession
    id: str = "task0123"


def registration(session: RecordingSession, offline: bool = False) -> EndpointRegistration:
    return EndpointRegistration(AppTask(StandInTask(session), offline, retry_base_s=0), "gemma.gguf",
                                "http://10.0.0.5:8080/v1", "gemma.gguf", "org/repo/gemma.gguf", report_interval_s=30,
                                references=model_references("huggingface", "org/repo/gemma.gguf"))


HW = HardwareSample(at=0, cpu_system_pct=30, cpu_process_pct=50, memory_process_gb=0.5, memory_used_gb=6,
                    memory_total_gb=16, cpu_per_core_pct=[20.0, 40.0], net_rx_mbs=0.1, net_tx_mbs=0.2,
                    disk_read_mbs=1.5, disk_write_mbs=0.5,
                    gpus=[GPUSample(0, "gpu", 75.0, 3.0, 8.0, 61.0)])
# What the Model Endpoints monitor draws (the SDK's clearml/router/endpoint_telemetry.py sends these keys).
MACHINE_STATS = {"cpu_usage", "memory_used", "memory_free", "network_rx", "network_tx", "disk_read", "disk_write",
                 "gpu_usage", "gpu_memory_used", "gpu_memory_free", "gpu_temperature"}


def test_register_report_unregister_payloads() -> None:
    session = RecordingSession()
    reg = registration(session)
    reg.register()
    reg.report(requests_total=12, requests_per_min=3.5, latency_ms=41.6, hardware=HW)
    reg.unregister()
    actions = [c[1] for c in session.calls]
    assert actions == ["register_container", "container_status_report", "unregister_container"]
    assert all(c[0] == "serving" and c[2] == "2.31" for c in session.calls)
    register, status, unregister = (c[3] for c in session.calls)
    assert REQUIRED <= set(register) and REQUIRED <= set(status)
    assert register["endpoint_url"] == "http://10.0.0.5:8080/v1"
    assert register["reference"] == [{"type": "task", "value": "task0123"},
                                     {"type": "url", "value": "https://huggingface.co/org/repo"}]
    assert isinstance(register["timeout"], int) and register["timeout"] >= 600
    assert status["latency_ms"] == 42 and isinstance(status["latency_ms"], int)
    assert status["requests_num"] == 12 and isinstance(status["uptime_sec"], int)
    assert unregister == {"container_id": "task0123"}
    stats = status["machine_stats"]
    assert set(stats) == MACHINE_STATS
    assert stats["cpu_usage"] == [20.0, 40.0] and stats["memory_used"] == 6 * 1024
    assert stats["memory_free"] == 10 * 1024 and stats["gpu_memory_free"] == [5 * 1024]
    assert all(isinstance(stats[k], list) for k in ("cpu_usage", "gpu_usage", "gpu_temperature"))


@pytest.mark.parametrize("offline,api_ok", [(True, True), (False, False)])
def test_skipped_quietly_offline_or_on_an_older_server(offline: bool, api_ok: bool,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    session = RecordingSession(api_ok=api_ok)
    reg = registration(session, offline=offline)
    reg.register()
    reg.report(1, 1.0, 1.0, HW)
    reg.unregister()
    assert session.calls == []
    assert len([r for r in caplog.records if "Model Endpoints registration skipped" in r.message]) == 1


def test_failures_are_logged_once_and_never_raise(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    session = RecordingSession(fail=True)
    reg = registration(session)
    reg.register()  # fails: not registered, so no status reports follow ...
    reg.report(1, 1.0, 1.0, HW)  # ... but each report tries the registration again
    assert [c[1] for c in session.calls] == ["register_container", "register_container"]
    session.fail = False
    reg.report(2, 1.0, 1.0, HW)
    assert [c[1] for c in session.calls][-2:] == ["register_container", "container_status_report"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "serving.register_container" in warnings[0].message
    assert any("recovered" in r.message for r in caplog.records)
