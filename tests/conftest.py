"""Shared fixtures: an isolated environment, a fake-engine server and the real app as a process."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from app.api.app import create_app
from app.api.context import ServingContext
from tests.clearml_double import ClearMLDouble, RunningDouble
from tests.fake_engine import FakeEngine

REPO = Path(__file__).resolve().parent.parent
API_KEY = "sk-test-key-0123456789"
QWEN_TEMPLATE = REPO / "tests" / "fixtures" / "templates" / "Qwen-Qwen2.5-7B-Instruct.jinja"


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's ClearML or Hugging Face settings."""
    home = tmp_path_factory.mktemp("home")
    for key in list(os.environ):
        if key.startswith(("CLEARML_", "TRAINS_", "HF_", "HUGGING_FACE")):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(home / "clearml-cache"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThreadedServer:
    """A real uvicorn server on a free port, in a thread, around create_app."""

    def __init__(self, context: ServingContext) -> None:
        self.context = context
        self.port = free_port()
        config = uvicorn.Config(create_app(context), host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def fake_server(fake_engine: FakeEngine) -> Iterator[ThreadedServer]:
    with ThreadedServer(ServingContext.serving(fake_engine, API_KEY)) as server:
        yield server


class AppProcess:
    """`python -m app` as a real process; its log lines are collected as they come."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.args = [sys.executable, "-m", "app", *args]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self.port: int | None = None

    def start(self) -> AppProcess:
        self.proc = subprocess.Popen(self.args, cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        threading.Thread(target=self._pump, daemon=True).start()
        return self

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            m = re.search(r"listening on [^ ]+:(\d+)", line)
            if m and self.port is None:
                self.port = int(m.group(1))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self, timeout: float = 120) -> AppProcess:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited with {self.proc.returncode}:\n{self.log}")
            if self.port is not None:
                try:
                    if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"app not ready after {timeout}s:\n{self.log}")

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="session")
def demo_model() -> str:
    from app.model_source import demo_model_path

    return demo_model_path()


@pytest.fixture(scope="session")
def real_app(demo_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppProcess]:
    """The real app on the real Gemma 270M model, shared by the end-to-end tests."""
    cache = tmp_path_factory.mktemp("real-app-clearml")
    app = AppProcess(["--offline", "--model", demo_model, "--port", "0", "--api-key", API_KEY, "--embeddings",
                      "--parallel", "4", "--n-ctx", "4096", "--idle-time-limit-hours", "0"],
                     env={"CLEARML_CACHE_DIR": str(cache)})
    app.start().wait_ready()
    yield app
    app.stop()


@pytest.fixture(scope="session")
def tool_model(demo_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("tool-model") / "gemma-with-qwen-template.gguf"
    tool = str(Path(sys.executable).parent / "gguf-new-metadata")
    subprocess.run([tool, "--chat-template-file", str(QWEN_TEMPLATE), demo_model, str(out)], check=True,
                   capture_output=True, timeout=300, input=b"y\n")
    return str(out)


@pytest.fixture(scope="session")
def tool_app(tool_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppProcess]:
    """The real app on the demo model with a released tool-calling template (Qwen 2.5's, Hermes-style)."""
    app = AppProcess(["--offline", "--model", tool_model, "--port", "0", "--api-key", API_KEY, "--parallel", "2",
                      "--n-ctx", "4096", "--idle-time-limit-hours", "0"],
                     env={"CLEARML_CACHE_DIR": str(tmp_path_factory.mktemp("tool-app"))})
    app.start().wait_ready()
    yield app
    app.stop()


# --- the ClearML REST double, as an open-source and as an Enterprise server ---------------------------------------

ROUTE = {"name": "llama-replicas", "enabled": True, "status": "active", "type": "path",
         "load_balancer": {"enabled": True}}


@pytest.fixture
def basic() -> Iterator[RunningDouble]:
    """An open-source server: no gateway."""
    with ClearMLDouble().serve() as running:
        yield running


@pytest.fixture
def enterprise() -> Iterator[RunningDouble]:
    """A server whose login token says "advanced": the AI Application Gateway and static routes."""
    with ClearMLDouble(feature_set="advanced", routes=[ROUTE]).serve() as running:
        yield running
