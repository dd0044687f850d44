"""Instances: launch, clone, export and import through `python -m app.instances` and the real SDK,
against the in-process ClearML REST double (tests/clearml_double.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app import config as cfg
from tests.clearml_double import ClearMLDouble, RunningDouble
from tests.conftest import REPO

SECRET_TOKEN = "hf_INSTANCEtoken_secret_55"


@pytest.fixture
def double(tmp_path: Path) -> Iterator[RunningDouble]:
    with ClearMLDouble().serve() as running:
        yield running


def cli(double: RunningDouble, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **double.double.env(double.url), "CLEARML_CACHE_DIR": str(tmp_path / "cache"),
           "HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "app.instances", *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=120)


def params(task: dict[str, Any]) -> dict[str, str]:
    return {f"{s}/{n}": p["value"] for s, sec in task["hyperparams"].items() if s in cfg.SECTIONS
            for n, p in sec.items()}


def only_task(double: RunningDouble) -> dict[str, Any]:
    assert len(double.double.tasks) == 1
    return next(iter(double.double.tasks.values()))


def test_launch_creates_and_enqueues(double: RunningDouble, tmp_path: Path) -> None:
    conf = tmp_path / "hf.json"
    conf.write_text(json.dumps({"format_version": 1, "General": {"model": "org/repo/m.gguf", "hf_token": SECRET_TOKEN},
                                "Advanced Options": {"n_ctx": 4096}}))
    out = cli(double, tmp_path, "launch", "--config", str(conf), "--set", "Advanced Options/parallel=2",
              "--n-gpu-layers", "20", "--queue", "gpu", "--task-name", "my endpoint", "--repo",
              "https://git.example/llama-clearml.git", "--branch", "main")
    assert out.returncode == 0, out.stderr
    task = only_task(double)
    assert task["name"] == "my endpoint" and task["type"] == "application"
    values = params(task)
    assert values["General/model"] == "org/repo/m.gguf"
    assert values["General/hf_token"] == SECRET_TOKEN  # the agent run needs it; exports mask it
    assert values["General/n_gpu_layers"] == "20"
    assert values["Advanced Options/n_ctx"] == "4096" and values["Advanced Options/parallel"] == "2"
    assert set(values) == {f"{cfg.field_section(n)}/{n}" for n in cfg.field_names()}
    described = task["hyperparams"]["General"]["n_gpu_layers"]
    assert "9999 = all" in described["description"] and described["type"] == "int"
    assert task["script"]["entry_point"] == "-m app"
    assert task["script"]["repository"] == "https://git.example/llama-clearml.git"
    assert "llama-cpp-python" in task["script"]["requirements"]["pip"]
    assert double.double.enqueued == [(task["id"], double.double.queue_id("gpu"))]
    assert task["id"] in out.stdout and "/output/log" in out.stdout


@pytest.mark.parametrize("args,field", [
    (["--model", "demo", "--set", "Advanced Options/mystery=1"], "mystery"),
    (["--model", "demo", "--set", "Advanced Options/n_ctx=lots"], "n_ctx"),
    (["--model", "demo", "--set", "General/n_ctx=2048"], "n_ctx"),
    ([], "model"),
])
def test_invalid_launch_creates_nothing(double: RunningDouble, tmp_path: Path, args: list[str], field: str) -> None:
    out = cli(double, tmp_path, "launch", *args)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and field in errors[0], out.stderr
    assert double.double.tasks == {} and "projects.create" not in double.double.endpoints()


def test_clone_copies_config_with_one_edit_and_drops_app_properties(double: RunningDouble, tmp_path: Path) -> None:
    assert cli(double, tmp_path, "launch", "--model", "demo", "--n-ctx", "4096").returncode == 0
    source = only_task(double)
    # What a run leaves on its task: properties the clone must not inherit.
    source["hyperparams"]["properties"] = {
        name: {"section": "properties", "name": name, "value": "old"} for name in ("status", "API key", "App URL")}
    out = cli(double, tmp_path, "clone", source["id"], "--set", "Advanced Options/n_ctx=2048", "--queue", "gpu")
    assert out.returncode == 0, out.stderr
    clone = [t for t in double.double.tasks.values() if t["id"] != source["id"]][0]
    before, after = params(source), params(clone)
    assert after.pop("Advanced Options/n_ctx") == "2048" and before.pop("Advanced Options/n_ctx") == "4096"
    assert after == before
    assert not clone["hyperparams"].get("properties")
    assert double.double.enqueued[-1] == (clone["id"], double.double.queue_id("gpu"))


def test_export_masks_secrets_and_round_trips_through_import(double: RunningDouble, tmp_path: Path) -> None:
    assert cli(double, tmp_path, "launch", "--model", "org/repo/m.gguf", "--hf-token", SECRET_TOKEN,
               "--api-key", "sk-instance", "--embeddings").returncode == 0
    source = only_task(double)
    masked, full = tmp_path / "masked.json", tmp_path / "full.json"
    assert cli(double, tmp_path, "export", source["id"], "-o", str(masked)).returncode == 0
    assert cli(double, tmp_path, "export", source["id"], "-o", str(full), "--include-secrets").returncode == 0
    doc = json.loads(masked.read_text())
    assert doc["format_version"] == 1 and set(doc) == {"format_version", *cfg.SECTIONS}
    assert doc["General"]["hf_token"] == "***" and doc["Advanced Options"]["api_key"] == "***"
    assert SECRET_TOKEN not in masked.read_text()
    assert json.loads(full.read_text())["General"]["hf_token"] == SECRET_TOKEN

    out = cli(double, tmp_path, "import", str(full), "--queue", "gpu", "--task-name", "imported")
    assert out.returncode == 0, out.stderr
    imported = [t for t in double.double.tasks.values() if t["name"] == "imported"][0]
    assert params(imported) == params(source)  # export then import: the same configuration

    assert cli(double, tmp_path, "import", str(masked), "--set", "General/model=demo").returncode == 0
    from_masked = params(list(double.double.tasks.values())[-1])
    assert from_masked["General/hf_token"] == "" and from_masked["General/model"] == "demo"


@pytest.mark.parametrize("doc,field", [
    ({"format_version": 1, "General": {"model": "demo", "colour": "red"}}, "colour"),
    ({"format_version": 1, "General": {"model": "demo"}, "Advanced Options": {"parallel": "many"}}, "parallel"),
    ({"format_version": 1, "General": {"n_gpu_layers": 0}}, "model"),
    ({"format_version": 2, "General": {"model": "demo"}}, "format_version"),
])
def test_invalid_import_reports_the_field_and_creates_nothing(double: RunningDouble, tmp_path: Path,
                                                              doc: dict[str, Any], field: str) -> None:
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(doc))
    out = cli(double, tmp_path, "import", str(f))
    assert out.returncode == 2 and field in out.stderr, out.stderr
    assert double.double.tasks == {} and double.double.enqueued == []


def test_round_trips_between_json_config_and_hyperparameter_strings() -> None:
    config = cfg.AppConfig(model="org/repo/m.gguf", hf_token="hf_x", n_gpu_layers=0, embeddings=True,
                           idle_time_limit_hours=0.25, chat_format="gemma")
    assert cfg.build(cfg.flatten_document(cfg.to_document(config, include_secrets=True))) == config
    # ClearML hands every value back as a string
    strings = {f"{cfg.field_section(n)}/{n}": str(v) for n, v in config.model_dump().items()}
    assert cfg.build(cfg.from_strings(strings)) == config


def test_shipped_example_configs_cover_the_common_cases() -> None:
    configs = {p.stem: cfg.build(cfg.load_json(p)) for p in (REPO / "configs").glob("*.json")}
    assert {"default", "huggingface", "clearml-model", "cpu-only", "gpu-long-context"} <= set(configs)
    assert configs["cpu-only"].n_gpu_layers == 0
    assert configs["gpu-long-context"].n_gpu_layers == 9999 and configs["gpu-long-context"].n_ctx >= 32768
    assert configs["clearml-model"].model and len(configs["clearml-model"].model) == 32
    assert configs["huggingface"].model.count("/") >= 2


@pytest.mark.parametrize("extra,image,args_has,script_has", [
    ([], "python:3.11-bookworm", "--network host", "build-essential cmake"),
    (["--profile", "gpu"], "nvidia/cuda:12.4.1-devel-ubuntu22.04", "-DGGML_CUDA=on", "python3-venv"),
    (["--profile", "gpu", "--docker-image", "my/cuda:1", "--docker-args", "--gpus 1 --network host"], "my/cuda:1",
     "--gpus 1", "python3-venv"),
])
def test_each_profile_writes_its_container(double: RunningDouble, tmp_path: Path, extra: list[str], image: str,
                                           args_has: str, script_has: str) -> None:
    out = cli(double, tmp_path, "launch", "--model", "org/repo/m.gguf", "--repo", "https://git.example/x.git",
              "--branch", "main", *extra)
    assert out.returncode == 0, out.stderr
    container = only_task(double)["container"]
    assert container["image"] == image
    assert args_has in container["arguments"]
    assert script_has in container["setup_shell_script"]


def test_a_clone_keeps_or_replaces_the_container(double: RunningDouble, tmp_path: Path) -> None:
    assert cli(double, tmp_path, "launch", "--model", "demo", "--profile", "gpu", "--repo",
               "https://git.example/x.git", "--branch", "main").returncode == 0
    source = only_task(double)
    assert cli(double, tmp_path, "clone", source["id"]).returncode == 0
    assert cli(double, tmp_path, "clone", source["id"], "--profile", "cpu").returncode == 0
    kept, replaced = [t for t in double.double.tasks.values() if t["id"] != source["id"]]
    assert kept["container"]["image"] == source["container"]["image"] == "nvidia/cuda:12.4.1-devel-ubuntu22.04"
    assert replaced["container"]["image"] == "python:3.11-bookworm"


def test_an_unknown_queue_creates_nothing(double: RunningDouble, tmp_path: Path) -> None:
    out = cli(double, tmp_path, "launch", "--model", "demo", "--queue", "nope", "--repo",
              "https://git.example/x.git", "--branch", "main")
    assert out.returncode == 1
    assert "no queue named 'nope'" in out.stderr and "default" in out.stderr
    assert double.double.tasks == {}
