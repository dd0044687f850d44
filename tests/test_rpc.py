"""llama.cpp RPC on this machine: two `python -m app.rpc_worker` processes on 127.0.0.1 and the real app as their
leader (the demo model's layers split across the workers), compared with the single-process app; and the ClearML
story against the REST double: a worker task publishes its endpoint, a leader task waits for it, loads across it,
and the worker exits when its leader stops. Needs a llama-cpp-python built with RPC (`make install` builds one)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app import config as cfg
from app.clearml.workers import ENDPOINT_PROPERTY, WORKER_SECTION
from tests.clearml_double import ClearMLDouble, RunningDouble
from tests.conftest import API_KEY, REPO, AppProcess, free_port

pytestmark = pytest.mark.skipif(
    not __import__("llama_cpp").llama_supports_rpc(),
    reason="llama-cpp-python was built without RPC: make install rebuilds it with CMAKE_ARGS=-DGGML_RPC=on")

PROMPT = "The three primary colours are"


class Worker:
    """`python -m app.rpc_worker` as a real process."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "app.rpc_worker", *args], cwd=REPO,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: list[str] = []
        self.serving = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if "RPC worker serving" in line:
                self.serving.set()

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_serving(self, timeout: float = 60) -> Worker:
        if not self.serving.wait(timeout):
            raise RuntimeError(f"the worker did not start:\n{self.log}")
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def workers() -> Iterator[list[str]]:
    ports = [free_port(), free_port()]
    procs = [Worker("--host", "127.0.0.1", "--port", str(p), "--threads", "1") for p in ports]
    try:
        for w in procs:
            w.wait_serving()
        yield [f"127.0.0.1:{p}" for p in ports]
    finally:
        for w in procs:
            w.stop()


@pytest.fixture(scope="module")
def rpc_app(workers: list[str], demo_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppProcess]:
    app = AppProcess(["--offline", "--model", demo_model, "--port", "0", "--api-key", API_KEY, "--parallel", "4",
                      "--n-ctx", "4096", "--idle-time-limit-hours", "0", "--rpc-servers", ",".join(workers)],
                     env={"CLEARML_CACHE_DIR": str(tmp_path_factory.mktemp("rpc-app"))})
    app.start().wait_ready()
    yield app
    app.stop()


@pytest.fixture(scope="module")
def unpacked_app(demo_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppProcess]:
    """The single-process twin of rpc_app: the same kernels (the workers do not repack weights)."""
    app = AppProcess(["--offline", "--model", demo_model, "--port", "0", "--api-key", API_KEY, "--parallel", "4",
                      "--n-ctx", "4096", "--idle-time-limit-hours", "0", "--no-repack-weights"],
                     env={"CLEARML_CACHE_DIR": str(tmp_path_factory.mktemp("unpacked-app"))})
    app.start().wait_ready()
    yield app
    app.stop()


def complete(app: AppProcess, prompt: str, n: int) -> str:
    client = openai.OpenAI(base_url=app.url + "/v1", api_key=API_KEY, max_retries=0)
    return client.completions.create(model="m", prompt=prompt, max_tokens=n, temperature=0).choices[0].text


def test_the_model_loads_across_both_workers(rpc_app: AppProcess, workers: list[str]) -> None:
    health = httpx.get(rpc_app.url + "/health").json()
    devices = health["devices"]
    assert [d["description"] for d in devices] == workers, devices
    layers = [d["layers"] for d in devices]
    assert all(n > 0 for n in layers) and sum(layers) == 19, devices  # Gemma 3 270M: 18 layers + the output layer
    assert any("layers per device: RPC0" in line for line in rpc_app.lines), rpc_app.log


def test_temperature_zero_matches_the_single_process_app(rpc_app: AppProcess, unpacked_app: AppProcess) -> None:
    # The workers compute each layer with the CPU kernels of plain (not repacked) weights, on the other side of a
    # socket: a single process with repacking off gives the same tokens. (With repacking on, the default, the
    # accumulation order differs and a greedy text may part ways after a few tokens.)
    for prompt in (PROMPT, "def fibonacci(n):", "Paris is the capital of"):
        assert complete(rpc_app, prompt, 24) == complete(unpacked_app, prompt, 24), prompt


def test_streams_are_batched_across_the_workers(rpc_app: AppProcess) -> None:
    client = openai.OpenAI(base_url=rpc_app.url + "/v1", api_key=API_KEY, max_retries=0)
    results: dict[int, tuple[str, str | None]] = {}

    def one(i: int) -> None:
        chunks = list(client.completions.create(model="m", prompt=f"Story {i}: once upon a time", max_tokens=32,
                                                temperature=0, stream=True, extra_body={"ignore_eos": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        results[i] = (text, [c.choices[0].finish_reason for c in chunks if c.choices][-1])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == [0, 1, 2]
    for i, (text, reason) in results.items():
        assert reason == "length" and text.strip(), (i, text)
    assert len({text for text, _ in results.values()}) == 3  # three different stories: nothing mixed up


@pytest.mark.parametrize("host", ["8.8.8.8", "0.0.0.0", "example.com"])
def test_a_worker_binds_private_addresses_only(host: str) -> None:
    out = subprocess.run([sys.executable, "-m", "app.rpc_worker", "--host", host, "--port", str(free_port())],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "private or loopback" in errors[0], out.stderr


def test_an_unreachable_worker_is_a_one_line_load_failure(demo_model: str, tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    app = AppProcess(["--offline", "--model", demo_model, "--port", "0", "--api-key", API_KEY,
                      "--rpc-servers", dead], env={"CLEARML_CACHE_DIR": str(tmp_path)}).start()
    code = app.wait_exit(120)
    assert code != 0 and code > 0  # a clean exit with a cause, not llama.cpp's abort (a signal)
    assert any(f"RPC server {dead}: cannot connect" in line for line in app.lines), app.log


def test_bad_rpc_settings_are_refused_before_anything_starts(tmp_path: Path) -> None:
    for value in ("nonsense", "10.0.0.1:99999", "10.0.0.1:5,10.0.0.1:5"):
        with pytest.raises(cfg.ConfigError, match="rpc_servers"):
            cfg.build({"model": "demo", "rpc_servers": value})
    with pytest.raises(cfg.ConfigError, match="rpc_worker_tasks"):
        cfg.build({"model": "demo", "rpc_worker_tasks": "abc;rm -rf"})


# --- as ClearML tasks, against the REST double --------------------------------------------------------------------

def sdk_config(tmp_path: Path) -> Path:
    conf = tmp_path / "clearml.conf"
    conf.write_text("sdk.development.worker.ping_period_sec: 1\nsdk.development.worker.report_period_sec: 1\n")
    return conf


def agent_env(running: RunningDouble, tmp_path: Path, task_id: str, name: str) -> dict[str, str]:
    return {**running.double.env(running.url), "CLEARML_TASK_ID": task_id, "CLEARML_LOG_TASK_TO_BACKEND": "0",
            "CLEARML_AGENT_HOST_IP": "127.0.0.1", "CLEARML_CONFIG_FILE": str(sdk_config(tmp_path)),
            "CLEARML_CACHE_DIR": str(tmp_path / f"cache-{name}")}


def test_worker_and_leader_tasks_find_each_other_and_stop_together(tmp_path: Path) -> None:
    with ClearMLDouble().serve() as running:
        double = running.double
        port = free_port()
        worker_values: dict[str, Any] = {"leader": "", "host": "", "port": port, "threads": 1,
                                         "idle_time_limit_hours": 1.0}
        worker_id = double.add_app_task(worker_values, {n: WORKER_SECTION for n in worker_values})
        leader_values = cfg.AppConfig(model="demo", port=0, api_key=API_KEY, idle_time_limit_hours=0.0,
                                      last_action_report_interval_sec=1, n_ctx=2048,
                                      rpc_worker_tasks=worker_id).model_dump()
        leader_id = double.add_app_task(leader_values, {n: cfg.field_section(n) for n in leader_values})
        double.tasks[worker_id]["hyperparams"][WORKER_SECTION]["leader"]["value"] = leader_id

        # The leader starts first and waits: an agent may take the workers from their queue later.
        leader = AppProcess([], env=agent_env(running, tmp_path, leader_id, "leader")).start()
        worker = Worker("--leader-poll-sec", "1", env=agent_env(running, tmp_path, worker_id, "worker"))
        try:
            worker.wait_serving()
            leader.wait_ready(180)
            endpoint = double.properties(worker_id)[ENDPOINT_PROPERTY]
            assert endpoint == f"127.0.0.1:{port}"  # the agent's host address (CLEARML_AGENT_HOST_IP)
            assert double.properties(worker_id)["status"] == "serving"
            devices = httpx.get(leader.url + "/health").json()["devices"]
            assert devices == [{"device": "RPC0", "description": endpoint, "layers": 19,
                                "free_mib": devices[0]["free_mib"]}]
            assert any(f"RPC worker {worker_id} serves at {endpoint}" in line for line in leader.lines), leader.log
            assert complete(leader, PROMPT, 8)
        finally:
            leader.stop()
        double.tasks[leader_id]["status"] = "stopped"  # what the agent reports once its child exited
        try:
            assert worker.proc.wait(60) == 0, worker.log
        finally:
            worker.stop()
        assert any(re.search(rf"exiting: the leader task {leader_id} is stopped", line) for line in worker.lines)
        assert double.properties(worker_id)["status"] == "stopped"
        # A worker never asks for a gateway route (the RPC protocol has no authentication).
        assert "_SERVICE" not in double.tasks[worker_id]["runtime"]
        assert "external_service" not in double.tasks[worker_id]["system_tags"]
