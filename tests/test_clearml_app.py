"""The app as a ClearML task, on the real SDK in offline mode and the real model."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai

from tests.conftest import API_KEY, AppProcess

HF_TOKEN = "hf_SECRETtoken_do_not_leak_123"


def session_dir(cache: Path) -> Path:
    dirs = [p for p in (cache / "offline").iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def read_events(path: Path) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    if not path.exists():
        return events
    for line in path.read_text().splitlines():
        if line.strip():
            chunk = json.loads(line)
            events.extend(chunk if isinstance(chunk, list) else [chunk])
    return events


def start(cache: Path, *extra: str, env: dict[str, str] | None = None) -> AppProcess:
    args = ["--offline", "--model", "demo", "--port", "0", "--api-key", API_KEY, *extra]
    return AppProcess(args, env={"CLEARML_CACHE_DIR": str(cache), **(env or {})}).start()


def test_offline_task_story_and_idle_shutdown(tmp_path: Path) -> None:
    app = start(tmp_path, "--hf-token", HF_TOKEN, "--idle-time-limit-hours", "0.002",  # 7.2 s
                "--last-action-report-interval-sec", "1")
    app.wait_ready()
    client = openai.OpenAI(base_url=app.url + "/v1", api_key=API_KEY, max_retries=0)
    for _ in range(3):
        client.completions.create(model="g", prompt="Hello", max_tokens=4)
    last_request = time.time()
    code = app.wait_exit(60)
    elapsed = time.time() - last_request
    assert code == 0, app.log
    assert 7.0 <= elapsed < 15, elapsed  # the limit, plus at most a watchdog period and the exit

    session = session_dir(tmp_path)
    task = json.loads((session / "task.json").read_text())
    hyper = task["hyperparams"]
    assert hyper["General"]["model"]["value"] == "demo"
    assert hyper["General"]["n_gpu_layers"]["value"] == "9999"
    assert "9999 = all" in hyper["General"]["n_gpu_layers"]["description"]
    assert hyper["Advanced Options"]["idle_time_limit_hours"]["value"] == "0.002"
    assert hyper["Advanced Options"]["idle_time_limit_hours"]["description"]
    props = {k: v["value"] for k, v in hyper["properties"].items()}
    assert props["status"] == "stopped"
    assert props["API base"].startswith("http://localhost:") and props["API base"].endswith("/v1")
    assert props["API key"] == API_KEY
    assert "curl" in props["test command"]
    assert props["GPU offload"] == "no GPU on this machine: CPU only"
    assert props["last action"].endswith("+00:00")  # ISO 8601 in UTC: no guessing the agent's time zone

    scalars = [e for e in read_events(session / "metrics.jsonl") if e.get("type") == "training_stats_scalar"]
    last_action = [e for e in scalars if e["metric"] == "last action"]
    assert len(last_action) >= 3
    totals = [e["value"] for e in scalars if e["metric"] == "requests" and e["variant"] == "total"]
    assert max(totals) == 3
    series = {(e["metric"], e["variant"]) for e in scalars}
    expected = {("requests", "per interval"), ("requests", "total"), ("requests", "in flight"),
                ("requests", "queued"), ("latency ms", "p50"), ("latency ms", "p95"), ("latency ms", "ttft p50"),
                ("tokens", "per second"), ("tokens", "generated per interval"), ("last action", "seconds since"),
                *((":monitor:machine", s) for s in ("cpu_usage", "memory_used_gb", "memory_free_gb",
                                                     "disk_free_percent", "network_tx_mbs", "network_rx_mbs",
                                                     "io_read_mbs", "io_write_mbs"))}
    assert expected <= series, expected - series
    assert not any(title == ":monitor:gpu" for title, _ in series)  # no GPU on this machine
    p50 = [e["value"] for e in scalars if (e["metric"], e["variant"]) == ("latency ms", "p50")]
    assert p50 and all(1 < v < 10_000 for v in p50)  # 4-token completions on a 270M model
    assert sum(e["value"] for e in scalars if (e["metric"], e["variant"]) == ("requests", "per interval")) == 3
    memory = [e["value"] for e in scalars if (e["metric"], e["variant"]) == (":monitor:machine", "memory_used_gb")]
    assert all(0.1 < v < 8 for v in memory)

    console = "\n".join(e.get("msg", "") for e in read_events(session / "log.jsonl"))
    order = [console.find(s) for s in ("status: loading", "status: idle", "status: active", "status: stopped")]
    assert all(i >= 0 for i in order) and order[0] < order[1] < order[2] < order[3], console[-2000:]
    assert "idle for" in console
    # The model starts loading before ClearML on a local run: its first lines reach the console all the same,
    # and the model is loaded once.
    assert "model file: gemma-3-270m-q4_k_m.gguf" in console
    assert sum("model file:" in line for line in app.lines) == 1

    everything = app.log + "".join(p.read_text(errors="replace") for p in session.rglob("*") if p.is_file())
    assert HF_TOKEN not in everything


def test_ui_edits_win_and_bad_values_fail_clearly(tmp_path: Path) -> None:
    first = start(tmp_path, "--idle-time-limit-hours", "0.0003")  # ~1 s after ready
    first.wait_ready()
    assert first.wait_exit(60) == 0
    session = session_dir(tmp_path)
    task_json = session / "task.json"
    data = json.loads(task_json.read_text())
    data["hyperparams"]["Advanced Options"]["model_alias"]["value"] = "edited-in-the-ui"
    data["hyperparams"]["Advanced Options"]["parallel"]["value"] = "2"
    data["hyperparams"]["Advanced Options"]["idle_time_limit_hours"]["value"] = "0"
    task_json.write_text(json.dumps(data))

    env = {"CLEARML_OFFLINE_MODE": "1", "CLEARML_TASK_ID": session.name}
    rerun = AppProcess(["--port", "0"], env={"CLEARML_CACHE_DIR": str(tmp_path), **env}).start()
    try:
        rerun.wait_ready()
        key = json.loads(task_json.read_text())["hyperparams"]["properties"]["API key"]["value"]
        models = httpx.get(rerun.url + "/v1/models", headers={"X-Api-Key": key}).json()
        assert [m["id"] for m in models["data"]] == ["edited-in-the-ui"]
        assert httpx.get(rerun.url + "/health").json()["slots_idle"] == 2
    finally:
        rerun.stop()

    data = json.loads(task_json.read_text())
    data["hyperparams"]["Advanced Options"]["n_ctx"]["value"] = "lots"
    task_json.write_text(json.dumps(data))
    bad = AppProcess(["--port", "0"], env={"CLEARML_CACHE_DIR": str(tmp_path), **env}).start()
    assert bad.wait_exit(60) == 2
    errors = [line for line in bad.lines if "ERROR" in line]
    assert len(errors) == 1 and "n_ctx" in errors[0], bad.log
    assert "downloading" not in bad.log and "loading" not in bad.log.lower().replace("status: loading", "")


def test_a_long_stream_keeps_the_app_alive(tmp_path: Path) -> None:
    app = start(tmp_path, "--idle-time-limit-hours", "0.0006")  # ~2.2 s
    app.wait_ready()
    client = openai.OpenAI(base_url=app.url + "/v1", api_key=API_KEY, max_retries=0)
    begun = time.time()
    chunks = list(client.completions.create(model="g", prompt="Once", max_tokens=300, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert time.time() - begun > 3  # longer than the idle limit
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert app.wait_exit(30) == 0


def test_missing_model_fails_with_one_line(tmp_path: Path) -> None:
    app = AppProcess(["--offline", "--model", str(tmp_path / "nope.gguf"), "--port", "0"],
                     env={"CLEARML_CACHE_DIR": str(tmp_path)}).start()
    assert app.wait_exit(60) == 1
    assert any("model file not found" in line for line in app.lines if "ERROR" in line), app.log


def test_no_clearml_config_falls_back_to_offline_with_one_warning(tmp_path: Path) -> None:
    app = AppProcess(["--model", "demo", "--port", "0", "--idle-time-limit-hours", "0.0003"],
                     env={"CLEARML_CACHE_DIR": str(tmp_path), "HOME": str(tmp_path)}).start()
    app.wait_ready()
    assert app.wait_exit(60) == 0
    assert sum("running in offline mode" in line and "WARNING" in line for line in app.lines) == 1, app.log


def test_sigterm_drains_and_reports_stopped(tmp_path: Path) -> None:
    import signal
    import threading

    app = start(tmp_path, "--idle-time-limit-hours", "0")
    app.wait_ready()
    client = openai.OpenAI(base_url=app.url + "/v1", api_key=API_KEY, max_retries=0)
    result: dict[str, Any] = {}

    def long_stream() -> None:
        chunks = list(client.completions.create(model="g", prompt="Once", max_tokens=120, stream=True,
                                                extra_body={"ignore_eos": True}))
        result["reason"] = [c.choices[0].finish_reason for c in chunks if c.choices][-1]

    worker = threading.Thread(target=long_stream)
    worker.start()
    time.sleep(0.5)
    assert app.proc is not None
    app.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    late = httpx.post(app.url + "/v1/completions", headers={"X-Api-Key": API_KEY},
                      json={"prompt": "too late", "max_tokens": 2})
    assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
    assert app.wait_exit(60) == 0
    worker.join(30)
    assert result.get("reason") == "length"  # the in-flight stream finished in full
    props = json.loads((session_dir(tmp_path) / "task.json").read_text())["hyperparams"]["properties"]
    assert props["status"]["value"] == "stopped"
