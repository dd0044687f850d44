"""Scale-out through `python -m app.instances` and the real SDK, against the ClearML REST double: replicas of one
configuration (one key, one route, one Model Endpoints name), scaling a group up and down, the nginx upstream for
a server without the gateway, and a leader launched with RPC worker tasks."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import openai
import pytest

from app import config as cfg
from app.clearml.workers import WORKER_SECTION
from tests.clearml_double import ClearMLDouble, RunningDouble
from tests.conftest import API_KEY, AppProcess
from tests.test_clearml_online import AGENT_HOST_IP, sdk_config
from tests.test_instances import cli, params

REPO_ARGS = ["--repo", "https://git.example/llama-clearml.git", "--branch", "main"]


def group_tasks(double: ClearMLDouble, group: str) -> list[dict[str, Any]]:
    return [t for t in double.tasks.values() if f"replica-group:{group}" in (t.get("tags") or [])]


def set_running(double: ClearMLDouble, task_id: str, app_status: str, api_base: str = "") -> None:
    """What an agent and the app itself leave on a replica that runs: in_progress, the app's status property."""
    task = double.tasks[task_id]
    task["status"] = "in_progress"
    double.enqueued = [(tid, q) for tid, q in double.enqueued if tid != task_id]
    props = task["hyperparams"].setdefault("properties", {})
    for name, value in (("status", app_status), ("API base", api_base)):
        props[name] = {"section": "properties", "name": name, "value": value}


def launch_group(running: RunningDouble, tmp_path: Path, group: str, n: int, *extra: str) -> list[dict[str, Any]]:
    out = cli(running, tmp_path, "launch", "--model", "org/repo/m.gguf", "--replicas", str(n), "--group", group,
              *REPO_ARGS, *extra)
    assert out.returncode == 0, out.stderr
    return group_tasks(running.double, group)


def test_replicas_share_configuration_key_and_route(basic: RunningDouble, tmp_path: Path) -> None:
    out = cli(basic, tmp_path, "launch", "--model", "org/repo/m.gguf", "--replicas", "3", "--group", "Chat Pool",
              "--parallel", "2", *REPO_ARGS)
    assert out.returncode == 0, out.stderr
    double = basic.double
    tasks = group_tasks(double, "Chat Pool")
    assert len(tasks) == 3 == len(double.tasks)
    values = [params(t) for t in tasks]
    assert values[0] == values[1] == values[2]  # one configuration
    key = values[0]["Advanced Options/api_key"]
    assert key.startswith("sk-") and len(key) > 20  # generated once, shared: one key for clients
    assert values[0]["Advanced Options/static_route"] == "chat-pool"  # one gateway route, where there is one
    assert values[0]["Advanced Options/parallel"] == "2"
    assert [t["name"] for t in tasks] == ["llama.cpp endpoint #1", "llama.cpp endpoint #2", "llama.cpp endpoint #3"]
    assert sorted(tid for tid, _ in double.enqueued) == sorted(t["id"] for t in tasks)
    # The same served name is the same Model Endpoints endpoint name for every replica.
    assert len({cfg.build(cfg.from_strings(v)).served_name for v in values}) == 1
    # An open-source server: said, with every replica and how to balance them.
    assert "no AI Application Gateway" in out.stdout and "endpoints Chat Pool" in out.stdout
    assert all(t["id"] in out.stdout for t in tasks)


def test_on_an_enterprise_server_each_replica_asks_for_the_shared_route(enterprise: RunningDouble,
                                                                         tmp_path: Path) -> None:
    tasks = launch_group(enterprise, tmp_path, "llama-replicas", 2, "--set", "General/model=demo")
    double = enterprise.double
    out_text = "gateway route 'llama-replicas'"
    assert len(tasks) == 2
    apps = []
    try:
        for task in tasks:  # what two agents do with the two queued replicas
            task["status"] = "in_progress"
            hyper = task["hyperparams"]
            hyper["Advanced Options"]["port"]["value"] = "0"
            hyper["Advanced Options"]["idle_time_limit_hours"]["value"] = "0"
            env = {**double.env(enterprise.url), "CLEARML_TASK_ID": task["id"], "CLEARML_LOG_TASK_TO_BACKEND": "0",
                   "CLEARML_AGENT_HOST_IP": AGENT_HOST_IP, "CLEARML_CONFIG_FILE": str(sdk_config(tmp_path)),
                   "CLEARML_CACHE_DIR": str(tmp_path / f"cache-{task['id']}")}
            apps.append(AppProcess([], env=env).start())
        for app in apps:
            app.wait_ready(180)
        key = params(tasks[0])["Advanced Options/api_key"]
        for app, task in zip(apps, tasks, strict=True):
            runtime = double.tasks[task["id"]]["runtime"]
            assert runtime["_ROUTER_ENDPOINT_MODE_PARAM"] == "llama-replicas"  # both on the one route
            assert double.properties(task["id"])["API base"].startswith(double.gateway_url + "/llama-replicas")
            client = openai.OpenAI(base_url=app.url + "/v1", api_key=key, max_retries=0)
            assert client.models.list().data  # the shared key opens each replica
    finally:
        for app in apps:
            app.stop()
    assert len({double.properties(t["id"])["API base"] for t in tasks}) == 1  # clients see one URL
    out = cli(enterprise, tmp_path, "launch", "--model", "org/repo/m.gguf", "--replicas", "2", "--group",
              "llama-replicas", *REPO_ARGS)
    assert out.returncode == 0 and out_text in out.stdout and "no AI Application Gateway" not in out.stdout


def test_scale_up_clones_the_newest_and_down_stops_queued_then_idle(basic: RunningDouble, tmp_path: Path) -> None:
    double = basic.double
    first, second = launch_group(basic, tmp_path, "pool", 2)
    set_running(double, first["id"], "active", "http://10.0.0.5:8080/v1")
    set_running(double, second["id"], "idle", "http://10.0.0.6:8081/v1")
    before = set(double.tasks)

    out = cli(basic, tmp_path, "scale", "pool", "--replicas", "4")
    assert out.returncode == 0, out.stderr
    added = [double.tasks[t] for t in double.tasks if t not in before]
    assert len(added) == 2 and all(t["parent"] == second["id"] for t in added)  # clones of the newest
    assert sorted(t["name"] for t in added) == ["llama.cpp endpoint #3", "llama.cpp endpoint #4"]
    assert all(params(t) == params(first) for t in added)  # same configuration, same key
    assert all("replica-group:pool" in t["tags"] for t in added)
    assert all("API base" not in double.properties(t["id"]) or not double.properties(t["id"])["API base"]
               for t in added)  # a clone starts without the source's published address
    assert sorted(tid for tid, _ in double.enqueued) == sorted(t["id"] for t in added)

    out = cli(basic, tmp_path, "scale", first["id"], "--replicas", "1")  # a replica's ID names its group
    assert out.returncode == 0, out.stderr
    # Queued ones go first (they leave the queue, stopped), then the idle one gets the UI's abort: it drains,
    # unregisters and reports stopped itself. The active one is untouched.
    assert all(double.tasks[t["id"]]["status"] == "stopped" for t in added)
    assert double.enqueued == []
    assert double.tasks[second["id"]]["status"] == "in_progress"
    assert double.tasks[second["id"]]["status_message"] == "stopping"
    assert double.tasks[first["id"]]["status"] == "in_progress"
    assert double.tasks[first["id"]].get("status_message", "") != "stopping"
    assert out.stdout.count("stopping: task") == 3

    out = cli(basic, tmp_path, "scale", "pool", "--replicas", "2")  # the idle one is still live until it stops
    assert out.returncode == 0 and "already has 2" in out.stdout


def test_endpoints_prints_each_url_and_an_nginx_upstream(basic: RunningDouble, tmp_path: Path) -> None:
    double = basic.double
    a, b, c = launch_group(basic, tmp_path, "edge", 3)
    set_running(double, a["id"], "active", "http://10.0.0.5:8080/v1")
    set_running(double, b["id"], "idle", "http://10.0.0.6:8081/v1")
    out = cli(basic, tmp_path, "endpoints", "edge", "--listen", "9000")
    assert out.returncode == 0, out.stderr
    assert f"# {a['id']} (active): http://10.0.0.5:8080/v1" in out.stdout
    assert f"# {c['id']} (queued): no URL published yet" in out.stdout
    upstream = out.stdout[out.stdout.index("upstream"):]
    assert re.findall(r"server (\S+);", upstream) == ["10.0.0.5:8080", "10.0.0.6:8081"]
    assert "listen 9000;" in upstream and "proxy_buffering off;" in upstream
    assert upstream.count("{") == upstream.count("}")


def test_launch_with_rpc_workers_links_leader_and_workers(basic: RunningDouble, tmp_path: Path) -> None:
    out = cli(basic, tmp_path, "launch", "--model", "org/repo/big.gguf", "--rpc-workers", "2", "--rpc-queue", "gpu",
              "--task-name", "big model", *REPO_ARGS)
    assert out.returncode == 0, out.stderr
    double = basic.double
    by_name = {t["name"]: t for t in double.tasks.values()}
    leader = by_name["big model"]
    workers = [by_name["big model RPC worker #1"], by_name["big model RPC worker #2"]]
    assert params(leader)["Advanced Options/rpc_worker_tasks"] == ",".join(w["id"] for w in workers)
    for worker in workers:
        section = worker["hyperparams"][WORKER_SECTION]
        assert section["leader"]["value"] == leader["id"] and section["port"]["value"] == "50052"
        assert worker["script"]["entry_point"] == "-m app.rpc_worker"
        assert "-DGGML_RPC=on" in (worker.get("container") or {}).get("arguments", "")
    gpu, default = double.queue_id("gpu"), double.queue_id("default")
    assert double.enqueued == [(workers[0]["id"], gpu), (workers[1]["id"], gpu), (leader["id"], default)]
    assert "no authentication" in out.stdout


@pytest.mark.parametrize("args,message", [
    (["launch", "--model", "demo", "--replicas", "2", "--rpc-workers", "1"], "--rpc-workers with --replicas"),
    (["launch", "--model", "demo", "--replicas", "0"], "--replicas: at least 1"),
])
def test_refused_combinations_create_nothing(basic: RunningDouble, tmp_path: Path, args: list[str],
                                             message: str) -> None:
    out = cli(basic, tmp_path, *args)
    assert out.returncode == 2 and message in out.stderr
    assert basic.double.tasks == {}


def test_scaling_an_unknown_group_is_one_line(basic: RunningDouble, tmp_path: Path) -> None:
    out = cli(basic, tmp_path, "scale", "nobody", "--replicas", "2")
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "nobody" in errors[0], out.stderr
    assert API_KEY not in out.stderr


def test_clone_and_import_make_groups_too(basic: RunningDouble, tmp_path: Path) -> None:
    double = basic.double
    out = cli(basic, tmp_path, "launch", "--model", "org/repo/m.gguf", "--task-name", "solo", *REPO_ARGS)
    assert out.returncode == 0, out.stderr
    source = next(iter(double.tasks.values()))
    out = cli(basic, tmp_path, "clone", source["id"], "--replicas", "2", "--group", "twins",
              "--set", "Advanced Options/parallel=3")
    assert out.returncode == 0, out.stderr
    twins = group_tasks(double, "twins")
    assert len(twins) == 2 and params(twins[0]) == params(twins[1])
    assert params(twins[0])["Advanced Options/parallel"] == "3"
    assert params(twins[0])["Advanced Options/api_key"].startswith("sk-")
    assert "replica-group:twins" not in (source.get("tags") or [])  # the source joins no group
    doc = tmp_path / "export.json"
    assert cli(basic, tmp_path, "export", twins[0]["id"], "-o", str(doc)).returncode == 0
    out = cli(basic, tmp_path, "import", str(doc), "--replicas", "2", "--group", "imported", *REPO_ARGS)
    assert out.returncode == 0, out.stderr
    imported = group_tasks(double, "imported")
    assert len(imported) == 2 and params(imported[0]) == params(imported[1])
    # The export masked the key: the new group gets a key of its own, shared by its replicas.
    assert params(imported[0])["Advanced Options/api_key"] not in ("", "***")
    assert params(imported[0])["Advanced Options/api_key"] != params(twins[0])["Advanced Options/api_key"]


def test_rpc_settings_on_a_build_without_rpc_fail_the_check_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.engine import rpc_endpoints

    monkeypatch.setattr(rpc_endpoints, "build_supports_rpc", lambda: False)
    config = cfg.build({"model": "demo", "rpc_servers": "10.0.0.7:50052"})
    with pytest.raises(cfg.ConfigError) as err:
        cfg.check_runnable(config)
    assert "DGGML_RPC=on" in str(err.value) and "\n" not in str(err.value)
    cfg.check_runnable(cfg.build({"model": "demo"}))  # without RPC settings the build does not matter


def test_on_an_enterprise_server_the_route_must_exist_before_any_replica(enterprise: RunningDouble,
                                                                         tmp_path: Path) -> None:
    out = cli(enterprise, tmp_path, "launch", "--model", "org/repo/m.gguf", "--replicas", "2", "--group",
              "no-such-route", *REPO_ARGS)
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "'no-such-route' does not exist" in errors[0], out.stderr
    assert enterprise.double.tasks == {}  # nothing created: each replica would have fallen back to its own address
