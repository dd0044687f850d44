"""The app online, on the real SDK and the real model, against the ClearML REST double (tests/clearml_double.py).

Most runs play the agent's child: the double holds a launched task, `CLEARML_TASK_ID` names it and the agent's
environment is set (`CLEARML_LOG_TASK_TO_BACKEND=0`, `CLEARML_AGENT_HOST_IP`). Traffic goes to 127.0.0.1 only:
the published addresses (the gateway's `.invalid` URLs, the agent's host IP) are asserted as values, never called.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from app import config as cfg
from tests.clearml_double import ClearMLDouble, RunningDouble
from tests.conftest import API_KEY, AppProcess

AGENT_HOST_IP = "10.20.30.40"  # what the agent declares for its machine: published, never connected to
GATEWAY_WARNING = "the endpoint might not be accessible"



def sdk_config(tmp_path: Path) -> Path:
    """The SDK's status poll (abort) and pings every second instead of 15-30 s."""
    conf = tmp_path / "clearml.conf"
    conf.write_text("sdk.development.worker.ping_period_sec: 1\nsdk.development.worker.report_period_sec: 1\n")
    return conf


def run_as_agent(running: RunningDouble, tmp_path: Path, **fields: Any) -> tuple[AppProcess, str]:
    """`python -m app` as clearml-agent starts it, on a task whose form holds `fields`."""
    values = cfg.AppConfig(**{"model": "demo", "port": 0, "api_key": API_KEY, "idle_time_limit_hours": 0.0,
                              "last_action_report_interval_sec": 1, **fields}).model_dump()
    task_id = running.double.add_app_task(values, {name: cfg.field_section(name) for name in values})
    env = {**running.double.env(running.url), "CLEARML_TASK_ID": task_id, "CLEARML_LOG_TASK_TO_BACKEND": "0",
           "CLEARML_AGENT_HOST_IP": AGENT_HOST_IP, "CLEARML_CONFIG_FILE": str(sdk_config(tmp_path)),
           "CLEARML_CACHE_DIR": str(tmp_path / "cache")}
    return AppProcess([], env=env).start(), task_id


def container(double: ClearMLDouble, task_id: str) -> dict[str, Any]:
    """The Model Endpoints row as registered."""
    return next(c.body for c in double.calls
                if c.endpoint == "serving.register_container" and c.body["container_id"] == task_id)


def test_gateway_routes_are_what_users_get(enterprise: RunningDouble, tmp_path: Path) -> None:
    app, task_id = run_as_agent(enterprise, tmp_path, static_route="llama-replicas")
    try:
        app.wait_ready()
        double = enterprise.double
        runtime = double.tasks[task_id]["runtime"]
        props = double.properties(task_id)
    finally:
        app.stop()
    # What the SDK asked the router for: this port on the agent's machine, on the shared route.
    assert runtime["_SERVICE"] == "EXTERNAL" and runtime["_ADDRESS"] == AGENT_HOST_IP
    assert runtime["_PORT"] == app.port and runtime["_ROUTER_ENDPOINT_MODE_PARAM"] == "llama-replicas"
    assert "external_service" in double.tasks[task_id]["system_tags"]
    assert "routers.get_routes" in double.endpoints()
    api_base = runtime["endpoint"].rstrip("/") + "/v1"
    assert props["App URL"] == runtime["browser_endpoint"]
    assert props["API base"] == api_base and api_base.startswith(double.gateway_url + "/llama-replicas")
    assert f"curl -s {api_base}/chat/completions" in props["test command"]
    assert container(double, task_id)["endpoint_url"] == api_base
    assert not any(GATEWAY_WARNING in line for line in app.lines), app.log


def test_without_a_gateway_the_agent_host_is_published_with_one_warning(basic: RunningDouble,
                                                                         tmp_path: Path) -> None:
    app, task_id = run_as_agent(basic, tmp_path, idle_time_limit_hours=0.0005)  # 1.8 s
    app.wait_ready()
    assert app.wait_exit(60) == 0, app.log
    double = basic.double
    props = double.properties(task_id)
    direct = f"http://{AGENT_HOST_IP}:{app.port}"
    assert props["App URL"] == direct and props["API base"] == direct + "/v1"
    assert f"curl -s {direct}/v1/chat/completions" in props["test command"]
    assert container(double, task_id)["endpoint_url"] == direct + "/v1"
    assert "_SERVICE" not in double.tasks[task_id]["runtime"]  # the SDK refused before asking the router
    warnings = [line for line in app.lines if GATEWAY_WARNING in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0] and "Enterprise" in warnings[0], app.log
    # The console the web UI shows under an agent: the agent's copy of the process output, plus what the SDK
    # sent itself. Each line once: the app leaves the forwarding to the agent.
    shown = app.lines + double.console(task_id)
    assert sum(GATEWAY_WARNING in line for line in shown) == 1
    assert sum("status: stopped" in line for line in shown) == 1
    # The machine plots under ClearML's own resource-monitor title, from the app's sampler.
    assert {(":monitor:machine", "cpu_usage"), (":monitor:machine", "memory_used_gb"), ("requests", "total")} <= {
        (e["metric"], e["variant"]) for e in double.scalars(task_id)}


def test_a_local_online_run_forwards_its_console_once_and_asks_no_gateway(enterprise: RunningDouble,
                                                                          tmp_path: Path) -> None:
    env = {**enterprise.double.env(enterprise.url), "CLEARML_CACHE_DIR": str(tmp_path / "cache")}
    app = AppProcess(["--model", "demo", "--port", "0", "--api-key", API_KEY, "--idle-time-limit-hours", "0.0005"],
                     env=env).start()
    app.wait_ready()
    assert app.wait_exit(60) == 0, app.log
    double = enterprise.double
    [task] = [t for t in double.tasks.values() if t["name"] == "llama.cpp endpoint"]
    assert task["status"] == "completed"
    assert "_SERVICE" not in task["runtime"] and "external_service" not in (task.get("system_tags") or [])
    assert double.properties(task["id"])["API base"] == f"http://localhost:{app.port}/v1"
    console = double.console(task["id"])
    for text in ("status: idle", "status: stopped", "WARNING app.engine.chat"):  # INFO and WARNING, once each
        assert sum(text in line for line in console) == 1, (text, console)


def test_an_abort_from_the_ui_waits_for_the_whole_shutdown(basic: RunningDouble, tmp_path: Path) -> None:
    app, task_id = run_as_agent(basic, tmp_path)
    app.wait_ready()
    double = basic.double
    client = openai.OpenAI(base_url=app.url + "/v1", api_key=API_KEY, max_retries=0)
    result: dict[str, Any] = {}

    def long_stream() -> None:
        chunks = list(client.completions.create(model="g", prompt="Once", max_tokens=200, stream=True,
                                                extra_body={"ignore_eos": True}))
        result["reason"] = [c.choices[0].finish_reason for c in chunks if c.choices][-1]

    worker = threading.Thread(target=long_stream)
    worker.start()
    time.sleep(0.5)
    double.abort(task_id)  # what the web UI's Abort does to a task an agent runs
    aborted = time.monotonic()
    code = app.wait_exit(60)
    took = time.monotonic() - aborted
    worker.join(30)
    assert code == 0, app.log  # the app's own exit: the SDK's kill stood down once the task was closed
    assert result.get("reason") == "length"  # the in-flight stream finished in full
    assert double.unregistered == [task_id]
    assert double.properties(task_id)["status"] == "stopped"
    assert double.tasks[task_id]["runtime"]["_abort_callback_timeout"] >= 30  # at least the drain
    order = [next(i for i, line in enumerate(app.lines) if text in line)
             for text in ("USER ABORTED - LAUNCHING CALLBACK", "status: stopping (aborted from the ClearML UI)",
                          "status: stopped", "ClearML task closed")]
    assert order == sorted(order), app.log
    assert took < 30, took


@pytest.mark.parametrize("outage", ["503", "hang"])
def test_clearml_going_dark_mid_run_does_not_keep_an_idle_app_up(basic: RunningDouble, tmp_path: Path,
                                                                 outage: str) -> None:
    """503 for everything (the SDK retries a 503 "maintenance" forever) or no answer at all (a read timeout of
    300 s, retried): the idle limit still stops the app, and its ClearML calls at shutdown get a bounded time."""
    app, task_id = run_as_agent(basic, tmp_path, idle_time_limit_hours=0.002)  # 7.2 s
    app.wait_ready()
    client = openai.OpenAI(base_url=app.url + "/v1", api_key=API_KEY, max_retries=0)
    client.completions.create(model="g", prompt="Hello", max_tokens=4)
    last_request = time.monotonic()
    time.sleep(1.5)
    basic.double.outage = outage
    code = app.wait_exit(120)
    took = time.monotonic() - last_request
    assert code == 0, app.log
    assert 7.0 <= took < 7.2 + 1 + 10 + 20 + 10, took  # limit, watchdog period, reporter join, close budget, slack
    assert sum("ClearML did not answer within" in line for line in app.lines) == 1, app.log
    assert any("status: stopped (idle for" in line for line in app.lines)
