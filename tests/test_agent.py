"""`make test-agent`: the published clearml-agent runs a launched instance end to end, against the REST double.

`python -m app.instances launch` creates the task from a throwaway local clone of this checkout as it is now
(uncommitted edits and new files committed there, so the run tests the working tree like `make test` does; the
agent clones it as a `file://` URL), with a free port, a known API key and a short idle limit.
`clearml-agent execute --id` (venv mode, its own virtual environment under `.cache/agent`) then clones it,
installs `requirements.txt` into a cached venv, and runs `python -m app`, which reads its configuration from
the task's hyperparameters, publishes its properties, registers in Model Endpoints, answers a completion on
127.0.0.1, stops when idle and exits 0, which the agent reports as `completed`.

Marked `agent`: the default run (`make test`) leaves it out; `make test-agent` installs the agent and runs it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from openai import OpenAI

from tests.agent_double import AgentDouble
from tests.clearml_double import RunningDouble
from tests.conftest import REPO, free_port

pytestmark = pytest.mark.agent

AGENT_BIN = Path(os.environ.get("CLEARML_AGENT_BIN") or REPO / ".cache" / "agent" / "bin" / "clearml-agent")
# Kept between runs: the agent's venv cache makes the second run skip the install.
AGENT_CACHE = Path(os.environ.get("CLEARML_AGENT_CACHE") or REPO / ".cache" / "agent-cache")
API_KEY = "sk-agent-test-0123456789"
IDLE_LIMIT_HOURS = 0.01  # 36 s
REPORT_INTERVAL_S = 2
AGENT_TIMEOUT_S = 1500  # a cold run without llama-cpp-python's wheel in pip's cache builds it (~5 minutes)


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def pip_cache_dir() -> str:
    """The user's pip cache (llama-cpp-python's built wheel is there): HOME is isolated for the agent."""
    return os.environ.get("PIP_CACHE_DIR") or subprocess.run(
        [sys.executable, "-m", "pip", "cache", "dir"], check=True, capture_output=True, text=True).stdout.strip()


def agent_config(url: str, tmp: Path) -> Path:
    """The agent's clearml.conf: the double as api/web/files server, every cache and build folder in tmp except
    the venv cache, the base interpreter of this test's Python for the task's venv."""
    python = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    conf = tmp / "clearml.conf"
    conf.write_text(f"""
api {{
  api_server: "{url}"
  web_server: "{url}"
  files_server: "{url}/files"
  credentials {{ access_key: "double-key", secret_key: "double-secret" }}
}}
agent {{
  worker_id: "agent-double:0"
  git_user: ""
  git_pass: ""
  cpu_only: true
  python_binary: "{python}"
  package_manager {{ type: pip, system_site_packages: false }}
  venvs_dir: "{tmp / 'venvs-builds'}"
  venvs_cache {{ path: "{AGENT_CACHE / 'venvs-cache'}", max_entries: 2, free_space_threshold_gb: 0 }}
  vcs_cache {{ enabled: true, path: "{tmp / 'vcs-cache'}" }}
  pip_download_cache {{ enabled: true, path: "{tmp / 'pip-download-cache'}" }}
}}
sdk {{ storage {{ cache {{ default_base_dir: "{tmp / 'sdk-cache'}" }} }} }}
""", encoding="utf-8")
    return conf


class AgentRun:
    """`clearml-agent execute --id TASK` in a session of its own (the app it starts is in it too)."""

    def __init__(self, task_id: str, conf: Path, tmp: Path) -> None:
        self.log_path = tmp / "agent.log"
        home = tmp / "home"
        home.mkdir()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_"))}
        self.env.update(HOME=str(home), CLEARML_CONFIG_FILE=str(conf), PIP_CACHE_DIR=pip_cache_dir(),
                        PYTHONUNBUFFERED="1")
        self.args = [str(AGENT_BIN), "execute", "--id", task_id]
        self.cwd = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> AgentRun:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.args, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture
def double() -> Iterator[RunningDouble]:
    with AgentDouble().serve() as running:
        yield running


def snapshot(tmp: Path) -> Path:
    """This checkout as it is now, committed in a throwaway clone: tracked files with their edits, new files
    git does not ignore, deletions. Nothing in this checkout is written."""
    clone = tmp / "repo"
    git("clone", "--quiet", str(REPO), str(clone), cwd=tmp)
    names = {n for n in git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO).split("\0")
             if n and os.path.lexists(REPO / n)}
    for name in git("ls-files", "-z", cwd=clone).split("\0"):
        if name and name not in names:
            (clone / name).unlink()
    for name in names:
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, clone / name, follow_symlinks=False)
    git("add", "--all", cwd=clone)
    git("-c", "user.name=make test-agent", "-c", "user.email=test-agent@localhost", "commit", "--quiet",
        "--allow-empty", "--no-verify", "-m", "working tree snapshot for make test-agent", cwd=clone)
    return clone


def launch(double: RunningDouble, tmp: Path, port: int) -> str:
    """A task from a snapshot of this checkout, created and enqueued the way users do it (run from the snapshot,
    so the launcher and the agent's run have the same code)."""
    clone = snapshot(tmp)
    env = {**os.environ, **double.double.env(double.url), "HOME": str(tmp / "launch-home"),
           "CLEARML_CACHE_DIR": str(tmp / "launch-cache")}
    branch, commit = git("rev-parse", "--abbrev-ref", "HEAD", cwd=clone), git("rev-parse", "HEAD", cwd=clone)
    out = subprocess.run(
        [sys.executable, "-m", "app.instances", "launch", "--queue", "default", "--repo", clone.as_uri(),
         "--branch", branch, "--commit", commit, "--model", "demo", "--port", str(port), "--api-key", API_KEY,
         "--idle-time-limit-hours", str(IDLE_LIMIT_HOURS), "--last-action-report-interval-sec", str(REPORT_INTERVAL_S)],
        cwd=clone, env=env, text=True, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr
    (task_id,) = double.double.tasks
    return task_id


def wait_for_app(double: AgentDouble, task_id: str, agent: AgentRun) -> str:
    """The API base the app published, once /health answers on it; fails early if the agent exits first."""
    deadline = time.monotonic() + AGENT_TIMEOUT_S
    while time.monotonic() < deadline:
        assert agent.running(), f"the agent exited before the app was ready:\n{agent.tail()}"
        api_base = double.properties(task_id).get("API base", "")
        if api_base:
            port = urlparse(api_base).port
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    return api_base
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    raise AssertionError(f"the app was not ready after {AGENT_TIMEOUT_S} s:\n{agent.tail()}")


def in_order(endpoints: list[str], expected: list[str]) -> bool:
    """Is `expected` a subsequence of `endpoints`?"""
    remaining = iter(endpoints)
    return all(any(e == want for e in remaining) for want in expected)


def test_the_agent_runs_a_launched_instance_until_it_stops_idle(double: RunningDouble, tmp_path: Path) -> None:
    if not AGENT_BIN.is_file():
        pytest.skip(f"no clearml-agent at {AGENT_BIN}: run `make test-agent`")
    server = double.double
    assert isinstance(server, AgentDouble)
    port = free_port()
    task_id = launch(double, tmp_path, port)
    assert server.tasks[task_id]["status"] == "queued"

    with AgentRun(task_id, agent_config(double.url, tmp_path), tmp_path) as agent:
        api_base = wait_for_app(server, task_id, agent)
        # The port and the key come from the task's hyperparameters; the app binds all interfaces under the agent.
        assert urlparse(api_base).port == port, api_base
        local = f"http://127.0.0.1:{port}/v1"
        assert httpx.get(f"{local}/models", headers={"Authorization": "Bearer wrong-key"}).status_code == 401
        reply = OpenAI(base_url=local, api_key=API_KEY, max_retries=0).chat.completions.create(
            model="demo", temperature=0, max_tokens=8, messages=[{"role": "user", "content": "Say hello."}])
        assert reply.choices[0].message.content
        served_at = time.monotonic()
        rc = agent.wait(AGENT_TIMEOUT_S)
        stopped_after = time.monotonic() - served_at

    (tmp_path / "double-calls.txt").write_text("\n".join(server.endpoints()) + "\n", encoding="utf-8")  # to read
    log = agent.log_path.read_text(errors="replace")
    assert rc == 0, agent.tail()
    assert "Process completed successfully" in log
    assert IDLE_LIMIT_HOURS * 3600 - 5 <= stopped_after <= IDLE_LIMIT_HOURS * 3600 + 60, stopped_after

    task = server.tasks[task_id]
    assert task["status"] == "completed", task["status"]
    properties = server.properties(task_id)
    assert properties["status"] == "stopped"
    assert properties["API base"] == api_base and f":{port}" in properties["App URL"]
    assert properties["API key"] == API_KEY
    installed = {re.sub(r"[-_.]+", "-", name.lower()) + "==" + version for name, _, version in
                 (line.partition("==") for line in task["script"]["requirements"]["pip"])}
    assert "llama-cpp-python==0.3.36" in installed  # the agent's freeze of what it installed

    endpoints = server.endpoints()
    assert in_order(endpoints, ["tasks.dequeue", "tasks.started", "tasks.set_requirements",
                                "serving.register_container", "serving.container_status_report",
                                "serving.unregister_container", "tasks.completed", "workers.unregister"]), endpoints
    assert "tasks.edit_hyper_params" in endpoints and "events.add_batch" in endpoints
    assert not {"tasks.failed", "tasks.stopped"} & set(endpoints)
    assert server.containers == {} and server.unregistered == [task_id]
    assert server.unregistered_workers == ["agent-double:0"] and server.workers == {}
    assert max(r["requests_num"] for r in server.status_reports(task_id)) >= 1  # our completion was counted
    console = "\n".join(server.console(task_id))
    assert "ready: serving" in console and "status: stopped" in console  # the app's log
    assert "Process completed successfully" in console  # the agent's own console line
    assert server.refused == [], server.refused
