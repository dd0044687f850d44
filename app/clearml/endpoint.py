"""Where users reach this instance: the address it publishes (the AI Application Gateway's route under an agent
on an Enterprise server, else this machine's), and its row in the server's Model Endpoints table (open-source
server 1.17+, API 2.31)."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from app.clearml.session import AppTask, private_host
from app.endpoint import EndpointInfo, local_url
from app.telemetry.hardware import HardwareSample, machine_stats

log = logging.getLogger(__name__)

GATEWAY_WAIT_S = 90.0  # the SDK's default wait for the router to assign a route


def published_endpoint(task: AppTask | None, host: str, port: int, api_key: str, model: str,
                       static_route: str = "", gateway_wait_s: float = GATEWAY_WAIT_S) -> EndpointInfo:
    """The endpoint users are given for a socket bound to `host`:`port`.

    Under an agent, online, the gateway is asked for a route (`static_route`, or one of its own): the App URL is
    its `browser_endpoint` (session-authenticated, for browsers) and the API base its `endpoint` + /v1. A server
    without the gateway, a refused route or no route in time leaves this machine's address
    (`CLEARML_AGENT_HOST_IP`, else the SDK's private IP), said in one warning. Locally no gateway is asked for.
    """
    direct = EndpointInfo.for_url(local_url(host, port, private_host()), api_key, model)
    if task is None or task.offline or not task.running_remotely:
        return direct
    try:
        assigned = task.request_external_endpoint(port, static_route or None, gateway_wait_s)
    except Exception as exc:  # ValueError on an open-source server: no gateway there
        log.warning("no AI Application Gateway route (%s): the endpoint might not be accessible from outside "
                    "this network; publishing %s", exc, direct.app_url)
        return direct
    if not assigned or not assigned.get("endpoint"):
        log.warning("the AI Application Gateway assigned no route within %.0f s: the endpoint might not be "
                    "accessible from outside this network; publishing %s", gateway_wait_s, direct.app_url)
        return direct
    api = str(assigned["endpoint"]).rstrip("/")
    log.info("AI Application Gateway route: %s", api)
    return dataclasses.replace(EndpointInfo.for_url(api, api_key, model),
                               app_url=str(assigned.get("browser_endpoint") or api))


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
