"""This instance as a row of the server's Model Endpoints table (open-source server 1.17+, API 2.31)."""

from __future__ import annotations

import time
from typing import Any

from app.clearml.session import AppTask
from app.telemetry.hardware import HardwareSample, machine_stats


def model_references(spec_kind: str, spec: str) -> list[dict[str, str]]:
    """What links the row to its model: the ClearML model, or the Hugging Face repository's page."""
    if spec_kind == "clearml":
        return [{"type": "model", "value": spec}]
    if spec_kind == "huggingface":
        owner, repo, _ = spec.split("/", 2)
        return [{"type": "url", "value": f"https://huggingface.co/{owner}/{repo}"}]
    if spec_kind == "url":
        return [{"type": "url", "value": spec}]
    return []


class EndpointRegistration:
    """This instance as a row of the server's Model Endpoints table: register, report, unregister.

    Payloads follow the server's `serving` schema (API 2.31): the container is this task, `latency_ms` is an
    integer, and the registration lapses by itself `timeout` seconds after the last report, so a killed app does
    not linger in the table. Registration happens while the model loads (the row shows it loading) and, when
    the server refuses or is unreachable, is tried again with every report until it succeeds.
    """

    def __init__(self, task: AppTask, endpoint_name: str, endpoint_url: str, model_name: str, model_source: str,
                 report_interval_s: float, references: list[dict[str, str]] | None = None) -> None:
        self.task = task
        self.identity: dict[str, Any] = {
            "container_id": task.id, "endpoint_name": endpoint_name, "endpoint_url": endpoint_url,
            "model_name": model_name, "model_source": model_source,
            "reference": [{"type": "task", "value": task.id}, *(references or [])],
        }
        self.timeout_s = int(max(600, 3 * report_interval_s))
        self.started = time.monotonic()
        self.registered = False
        self._supported: bool | None = None

    def register(self) -> bool:
        if self._supported is None:
            self._supported = self.task.endpoints_supported()  # says why once when it is not
        if self._supported and not self.registered:
            self.registered = self.task.send_serving("register_container",
                                                     {**self.identity, "timeout": self.timeout_s})
        return self.registered

    def report(self, requests_total: int, requests_per_min: float, latency_ms: float,
               hardware: HardwareSample) -> None:
        if not self.register():
            return
        self.task.send_serving("container_status_report", {
            **self.identity, "uptime_sec": int(time.monotonic() - self.started), "requests_num": int(requests_total),
            "requests_min": float(requests_per_min), "latency_ms": int(round(latency_ms)),
            "machine_stats": machine_stats(hardware),
        })

    def unregister(self) -> None:
        if self.registered:
            self.task.send_serving("unregister_container", {"container_id": self.identity["container_id"]})
            self.registered = False
