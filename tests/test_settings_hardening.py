"""Settings that used to crash llama.cpp or leak a secret: refused with one line, or kept out of the task.

Process tests run `python -m app` and stop at the configuration (no model load); the
llama.cpp limits the configuration encodes are checked against llama.cpp itself in
child processes, so an upgrade that moves them shows up here.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest

from app import config as cfg
from app.main import build_parser, resolve_config, warn_visible_secrets
from app.model_source import ModelSourceError, fetch
from tests.conftest import API_KEY, REPO, AppProcess
from tests.fake_hub import FakeHub, RunningHub
from tests.test_units import write_tiny_gguf

HF_TOKEN = "hf_HARDENINGtoken_never_logged_42"


def run_to_exit(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> AppProcess:
    app = AppProcess(["--offline", "--port", "0", *args], env={"CLEARML_CACHE_DIR": str(tmp_path), **(env or {})})
    app.start().wait_exit(60)
    return app


def assert_refused(app: AppProcess, *words: str) -> None:
    """Exit 2, one ERROR line naming the cause, no backtrace, nothing bound or loaded."""
    assert app.proc is not None and app.proc.returncode == 2, app.log
    errors = [line for line in app.lines if " ERROR " in line]
    assert len(errors) == 1, app.log
    assert all(word in errors[0] for word in words), errors[0]
    assert "Traceback" not in app.log and "GGML_ASSERT" not in app.log
    assert "listening on" not in app.log and "loading " not in app.log


# --- 1. settings llama.cpp aborts on, and 6. model specs, refused before anything is bound -------------

TOO_MANY_THREADS = cfg.THREADS_PER_CORE * cfg.usable_cores() + 1


@pytest.mark.parametrize("args,words", [
    (["--model", "demo", "--n-threads", "100000"], ["n_threads", "1024"]),
    (["--model", "demo", "--n-threads", str(TOO_MANY_THREADS)], ["n_threads", "usable core"]),
    (["--model", "demo", "--n-ctx", "16", "--parallel", "256"], ["n_ctx", "0 (auto) or at least 64"]),
    (["--model", "demo", "--n-batch", "2", "--parallel", "4"], ["n_batch (2)", "parallel (4)"]),
    (["--model", "demo", "--n-ctx", "256", "--n-batch", "512"], ["n_batch (512)", "n_ctx (256)"]),
    (["--model", "demo", "--last-action-report-interval-sec", "0.001"], ["last_action_report_interval_sec"]),
    (["--model", ""], ["model", "no model given"]),
    (["--model", "not-a-model"], ["model", "cannot tell what model"]),
])
def test_bad_settings_exit_2_with_one_line(tmp_path: Path, args: list[str], words: list[str]) -> None:
    assert TOO_MANY_THREADS <= cfg.MAX_THREADS  # else the machine check is not what is tested here
    assert_refused(run_to_exit(tmp_path, *args), *words)


def test_a_check_across_fields_never_echoes_secrets() -> None:
    with pytest.raises(cfg.ConfigError) as err:
        cfg.build({"model": "demo", "api_key": "sk-do-not-echo", "hf_token": HF_TOKEN, "n_batch": 2, "parallel": 4})
    assert "sk-do-not-echo" not in str(err.value) and HF_TOKEN not in str(err.value)
    assert str(err.value).startswith("invalid configuration: n_batch (2)") and "\n" not in str(err.value)


def test_the_machine_check_counts_usable_cores() -> None:
    fine = cfg.AppConfig(model="demo", n_threads=8)
    cfg.check_runnable(fine, cores=2)
    cfg.check_runnable(cfg.AppConfig(model="demo", n_threads=0), cores=1)  # 0 = all cores
    with pytest.raises(cfg.ConfigError, match="at most 8"):
        cfg.check_runnable(cfg.AppConfig(model="demo", n_threads=9), cores=2)
    # Launching for another machine is not refused: only the machine that serves checks its cores.
    assert cfg.build({"model": "demo", "n_threads": 256}).n_threads == 256


def test_defaults_stay_valid_without_a_model() -> None:
    config = cfg.AppConfig()  # exports, the README table and launches build this
    with pytest.raises(cfg.ConfigError, match="no model given"):
        cfg.check_runnable(config)
    for name in ("clearml-model", "cpu-only", "default", "gpu-long-context", "huggingface"):
        cfg.build(cfg.load_json(REPO / "configs" / f"{name}.json"))


LIMIT_PROBE = """
import sys
from app.engine.model import LlamaModel
from app.engine.settings import EngineSettings
n_ctx, n_batch, parallel = map(int, sys.argv[2:5])
LlamaModel(EngineSettings(path=sys.argv[1], model_id="probe", n_ctx=n_ctx, n_batch=n_batch, n_threads=2,
                          n_gpu_layers=0, parallel=parallel, max_queue=0, embeddings=False,
                          chat_format="auto", tool_format="auto", reasoning_format="auto", cache_type_k="f16",
                          cache_type_v="f16", flash_attn="auto", split_mode="layer", tensor_split=(), main_gpu=0,
                          n_cpu_moe=0)).close()
print("LOADED")
"""


def load_in_child(model: str, n_ctx: int, n_batch: int, parallel: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", LIMIT_PROBE, model, str(n_ctx), str(n_batch), str(parallel)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_the_limits_are_llama_cpps_own(demo_model: str) -> None:
    """The smallest batch the configuration accepts for 256 sequences loads; one token less aborts llama.cpp."""
    most = cfg.LLAMA_MAX_SEQUENCES
    ok = load_in_child(demo_model, most * cfg.MIN_N_CTX, most, most)
    assert "LOADED" in ok.stdout, ok.stderr[-2000:]
    aborted = load_in_child(demo_model, most * cfg.MIN_N_CTX, most - 1, most)
    assert aborted.returncode != 0 and "n_outputs_max" in aborted.stderr
    too_many = load_in_child(demo_model, 1024, 512, most + 1)
    assert too_many.returncode != 0 and f"n_seq_max must be <= {most}" in too_many.stderr


# --- 2. every interval and size has a floor and a ceiling -----------------------------------------

@pytest.mark.parametrize("field,low,high", [
    ("last_action_report_interval_sec", 0.999, 3600.5),
    ("idle_time_limit_hours", -0.1, 8761),
    ("max_queue", -1, 4097),
    ("n_ctx", 63, 2**20 + 1),
    ("n_batch", 0, 8193),
    ("n_threads", -1, 1025),
    ("parallel", 0, 257),
    ("port", -1, 65536),
    ("n_gpu_layers", -1, 10000),
])
def test_every_size_and_interval_is_bounded(field: str, low: float, high: float) -> None:
    roomy = {"model": "demo", "n_ctx": 2**20, "n_batch": 8192}  # so the cross-field checks do not fire first
    for value in (low, high):
        with pytest.raises(cfg.ConfigError, match=field):
            cfg.build({**roomy, field: value})


def test_the_bounds_themselves_are_accepted() -> None:
    cfg.build({"last_action_report_interval_sec": 1, "idle_time_limit_hours": 8760, "max_queue": 4096,
               "n_ctx": 2**20, "n_batch": 8192, "n_threads": 1024, "parallel": 256, "n_gpu_layers": 9999})
    cfg.build({"last_action_report_interval_sec": 3600, "n_ctx": 64, "n_batch": 1, "parallel": 1,
               "idle_time_limit_hours": 0, "max_queue": 0})


# --- 3. the Hugging Face token: a file, the environment, a warning for the flag -------------------------

def resolved(*argv: str) -> cfg.AppConfig:
    return resolve_config(build_parser().parse_args(["--model", "demo", *argv]))


def test_hf_token_file_is_read_and_stripped_with_flag_over_file_over_config(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"  {HF_TOKEN}\n")
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"hf_token": "hf_from_config"}))
    assert resolved("--hf-token-file", str(token_file)).hf_token == HF_TOKEN
    assert resolved("--config", str(conf), "--hf-token-file", str(token_file)).hf_token == HF_TOKEN
    assert resolved("--config", str(conf)).hf_token == "hf_from_config"
    assert resolved("--hf-token-file", str(token_file), "--hf-token", "hf_flag").hf_token == "hf_flag"


def test_an_unusable_token_file_is_a_config_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    for path, cause in ((tmp_path / "missing", "not found"), (empty, "is empty"), (tmp_path, "cannot read")):
        with pytest.raises(cfg.ConfigError, match=cause) as err:
            resolved("--hf-token-file", str(path))
        assert str(err.value).startswith("--hf-token-file:") and "\n" not in str(err.value)
    assert_refused(run_to_exit(tmp_path, "--model", "demo", "--hf-token-file", str(tmp_path / "missing")),
                   "--hf-token-file", "not found")


def test_secret_flags_cannot_be_abbreviated_past_the_scrubbing() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--api-k", API_KEY])


def test_the_token_flag_warns_that_ps_shows_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    warn_visible_secrets(build_parser().parse_args(["--hf-token", HF_TOKEN]))
    assert "process list" in caplog.text and HF_TOKEN not in caplog.text
    # The warning comes first, before anything else can fail (here: a model that names nothing).
    app = run_to_exit(tmp_path, "--model", "not-a-model", "--hf-token", HF_TOKEN)
    assert sum("--hf-token is visible" in line and "WARNING" in line for line in app.lines) == 1, app.log
    assert HF_TOKEN not in app.log


@pytest.fixture
def gated_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningHub]:
    fake = FakeHub()
    tiny = tmp_path / "tiny.gguf"
    write_tiny_gguf(tiny)
    fake.add("org/gated", "tiny.gguf", tiny)
    fake.gated["org/gated"] = HF_TOKEN
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with fake.serve() as running:
        monkeypatch.setenv("HF_ENDPOINT", running.url)
        yield running


def test_hf_token_from_the_environment_opens_a_gated_repo(gated_hub: RunningHub, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    assert fetch("org/gated/tiny.gguf").endswith("tiny.gguf")
    assert gated_hub.hub.gets("tiny.gguf")[-1].authorization == f"Bearer {HF_TOKEN}"
    assert "Hugging Face token: from HF_TOKEN" in caplog.text and HF_TOKEN not in caplog.text


def test_a_configured_token_beats_the_environment(gated_hub: RunningHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_stale_machine_token")
    fetch("org/gated/tiny.gguf", hf_token=HF_TOKEN)
    assert all(r.authorization == f"Bearer {HF_TOKEN}" for r in gated_hub.hub.requests)


# --- 4. a local run leaves no secret in the task's hyperparameters -------------------------------------

def test_a_local_run_keeps_secrets_out_of_the_hyperparameters(tmp_path: Path) -> None:
    # A model that passes the configuration but is missing: the run connects its task, binds, then fails.
    app = run_to_exit(tmp_path, "--model", str(tmp_path / "absent.gguf"), "--api-key", API_KEY,
                      "--hf-token", HF_TOKEN)
    assert app.proc is not None and app.proc.returncode == 1, app.log
    session = [p for p in (tmp_path / "offline").iterdir() if p.is_dir()][0]
    hyper: dict[str, Any] = json.loads((session / "task.json").read_text())["hyperparams"]
    assert hyper["Advanced Options"]["api_key"]["value"] == ""
    assert hyper["General"]["hf_token"]["value"] == ""
    assert hyper["properties"]["API key"]["value"] == API_KEY  # where users read the key in use
    sections = {k: v for k, v in hyper.items() if k != "properties"}
    assert API_KEY not in json.dumps(sections) and HF_TOKEN not in json.dumps(hyper)


# --- 5. HF_HUB_OFFLINE: a file not in the cache fails at once -------------------------------------------

def test_hub_offline_fails_at_once_without_retrying(gated_hub: RunningHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    cached = fetch("org/gated/tiny.gguf")  # online once: now in the cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    sleeps: list[float] = []
    monkeypatch.setattr("app.model_source.time.sleep", sleeps.append)
    asked = len(gated_hub.hub.requests)
    assert fetch("org/gated/tiny.gguf") == cached  # the cache still serves
    started = time.monotonic()
    with pytest.raises(ModelSourceError) as err:
        fetch("org/gated/absent.gguf")
    assert time.monotonic() - started < 2 and sleeps == []
    assert "HF_HUB_OFFLINE" in str(err.value) and "not in the Hugging Face cache" in str(err.value)
    assert "\n" not in str(err.value)
    assert len(gated_hub.hub.requests) == asked  # offline means offline
