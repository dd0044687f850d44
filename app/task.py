"""The only module that imports clearml: the task, its configuration, properties and scalars.

Every call that reaches ClearML goes through `AppTask`, which catches and
logs failures (once per outage) so reporting can never take serving down.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from app import config as cfg

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "llama.cpp Model Deployment"
DEFAULT_TASK_NAME = "llama.cpp endpoint"
SERVING_API_VERSION = "2.31"
RETRY_BASE_S = 5.0  # first retry after an outage starts; doubles up to RETRY_MAX_S
RETRY_MAX_S = 300.0


def has_credentials() -> bool:
    """Is a ClearML server configured at all (file or environment)?"""
    if os.environ.get("CLEARML_API_ACCESS_KEY") or os.environ.get("CLEARML_API_HOST"):
        return True
    config_file = os.environ.get("CLEARML_CONFIG_FILE")
    candidates = [Path(config_file)] if config_file else [Path.home() / "clearml.conf", Path.home() / ".clearml.conf"]
    return any(p.is_file() for p in candidates)


def offline_requested(flag: bool) -> bool:
    return flag or os.environ.get("CLEARML_OFFLINE_MODE", "").lower() in ("1", "true", "yes")


class AppTask:
    """A thin, failure-tolerant wrapper around the ClearML task of this app instance."""

    def __init__(self, task: Any, offline: bool, retry_base_s: float = RETRY_BASE_S) -> None:
        self.task = task
        self.offline = offline
        self._failing = False
        self._retry_base_s = retry_base_s
        self._retry_delay_s = retry_base_s
        self._retry_at = 0.0
        self._log_handler: Optional[logging.Handler] = None

    # --- start-up ------------------------------------------------------------------

    @classmethod
    def start(cls, offline: bool, project: str, name: str) -> "AppTask":
        from clearml import Task

        under_agent = bool(os.environ.get("CLEARML_TASK_ID"))
        if not offline and not under_agent and not has_credentials():
            log.warning("no ClearML server is configured (clearml-init / CLEARML_API_*): running in offline mode")
            offline = True
        if offline:
            Task.set_offline(True)
        # The reporter subprocess makes exit wait ~10 s; in-process reporting exits at once.
        Task._report_subprocess_enabled = False  # type: ignore[assignment]  # a private switch, see FACTS
        task: Any = Task.init(
            project_name=project, task_name=name, task_type=Task.TaskTypes.application,
            auto_connect_frameworks=False, auto_connect_arg_parser=False, reuse_last_task_id=False,
            auto_resource_monitoring=False, auto_connect_streams=False,
        )
        app_task = cls(task, offline)
        # The console is our log, forwarded record by record: nothing lost at a quick exit.
        handler = TaskLogHandler(task)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        app_task._log_handler = handler
        where = f"offline session {task.id}" if offline else f"task {task.id}"
        log.info("ClearML: %s", where)
        return app_task

    @property
    def id(self) -> str:
        return str(self.task.id)

    @property
    def running_remotely(self) -> bool:
        from clearml.config import running_remotely

        return bool(running_remotely())

    def remote_values(self) -> dict[str, Any]:
        """Configuration as edited in the UI (strings), when an agent runs this task."""
        raw = self.task.get_parameters() or {}
        return cfg.from_strings(raw)

    def connect_config(self, config: cfg.AppConfig) -> None:
        """Show what runs as the task's hyperparameters, each with its description."""
        values = config.model_dump()
        if not self.running_remotely:
            # A local run must not leave its secrets in the task for clones to copy: the HF token is the
            # user's own, and a clone generates a new API key unless one is set. The key in use is
            # shown in the "API key" property, where users read it.
            for name in cfg.secret_fields():
                values[name] = ""
        for section, names in _sections().items():
            self.task.connect({n: values[n] for n in names}, name=section)
        write_parameters(self.task, values)

    # --- reporting (never raises) -----------------------------------------------------

    def _guard(self, what: str, fn: Callable[[], Any], force: bool = False) -> bool:
        """Run one ClearML call; during an outage, try again only after an exponential backoff."""
        now = time.monotonic()
        if self._failing and not force and now < self._retry_at:
            return False  # still backing off: do not hammer a server that is down
        try:
            fn()
        except Exception as exc:  # ClearML down or refusing: serving goes on
            if not self._failing:
                log.warning("ClearML %s failed (%s); serving continues, retrying with backoff", what, exc)
                self._failing = True
                self._retry_delay_s = self._retry_base_s
            else:
                self._retry_delay_s = min(self._retry_delay_s * 2, RETRY_MAX_S)
            self._retry_at = now + self._retry_delay_s
            return False
        if self._failing:
            log.info("ClearML reporting recovered")
            self._failing = False
        return True

    def set_properties(self, **properties: Any) -> bool:
        props = {k: ("" if v is None else str(v)) for k, v in properties.items()}

        def update() -> None:
            self.task.set_user_properties(**props)
            if "status" in props and not self.offline:
                # Also a runtime property, where the server shows those (a no-op where it does not).
                self.task._set_runtime_properties({"status": props["status"]})
        return self._guard("property update", update)

    def report_scalar(self, title: str, series: str, value: float, iteration: int) -> bool:
        return self._guard("scalar report",
                           lambda: self.task.get_logger().report_scalar(title, series, float(value), iteration))

    def register_abort(self, callback: Callable[[], None]) -> None:
        if self.offline:
            # Offline, ClearML's status poll reads the task as reset and would terminate us.
            return
        self._guard("abort callback registration", lambda: self.task.register_abort_callback(callback))

    def mark_failed(self, cause: str) -> None:
        if not self.offline:
            self._guard("failure report", lambda: self.task.mark_failed(status_reason=cause, status_message=cause),
                        force=True)

    # --- Model Endpoints table (open-source server 1.17+, API 2.31) -----------------------

    def endpoints_supported(self) -> bool:
        """Can this server list us in its Model Endpoints table? Says why once when it cannot."""
        if self.offline:
            log.info("Model Endpoints registration skipped: offline")
            return False
        try:
            supported = bool(self.task.session.check_min_api_server_version(SERVING_API_VERSION))
        except Exception:
            supported = False
        if not supported:
            log.info("Model Endpoints registration skipped: the server's API is older than %s", SERVING_API_VERSION)
        return supported

    def send_serving(self, action: str, payload: dict[str, Any]) -> bool:
        """One call to the server's `serving` service; a refusal counts as a reporting failure."""
        def call() -> None:
            response = self.task.session.send_request("serving", action, version=SERVING_API_VERSION,
                                                      method="post", json=payload)
            if not response.ok:
                raise RuntimeError(f"serving.{action} answered HTTP {response.status_code}")
        return self._guard(f"serving.{action}", call)

    def close(self) -> None:
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
        self._guard("close", self.task.close, force=True)


class TaskLogHandler(logging.Handler):
    """Sends log records to the task's console; a failure here is dropped, never raised."""

    def __init__(self, task: Any) -> None:
        super().__init__(level=logging.INFO)
        self._logger = task.get_logger()
        self._inside = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._inside, "busy", False) or record.name.startswith("clearml"):
            return  # ClearML's own logging while we report would recurse
        self._inside.busy = True
        try:
            self._logger.report_text(self.format(record), level=record.levelno, print_console=False)
        except Exception:
            pass
        finally:
            self._inside.busy = False


class EndpointRegistration:
    """This instance as a row of the server's Model Endpoints table: register, report, unregister.

    Payloads follow the server's `serving` schema (API 2.31): the container is
    this task, `latency_ms` is an integer, and the registration lapses by
    itself `timeout` seconds after the last report, so a killed app does not
    linger in the table.
    """

    def __init__(self, task: AppTask, endpoint_name: str, endpoint_url: str, model_name: str, model_source: str,
                 report_interval_s: float) -> None:
        self.task = task
        self.identity = {
            "container_id": task.id, "endpoint_name": endpoint_name, "endpoint_url": endpoint_url,
            "model_name": model_name, "model_source": model_source,
            "reference": [{"type": "task", "value": task.id}],
        }
        self.timeout_s = int(max(600, 3 * report_interval_s))
        self.started = time.monotonic()
        self.registered = False

    def register(self) -> None:
        if self.task.endpoints_supported():
            self.registered = self.task.send_serving("register_container",
                                                     {**self.identity, "timeout": self.timeout_s})

    def report(self, requests_total: int, requests_per_min: float, latency_ms: float) -> None:
        if not self.registered:
            return
        self.task.send_serving("container_status_report", {
            **self.identity, "uptime_sec": int(time.monotonic() - self.started), "requests_num": int(requests_total),
            "requests_min": float(requests_per_min), "latency_ms": int(round(latency_ms)),
        })

    def unregister(self) -> None:
        if self.registered:
            self.task.send_serving("unregister_container", {"container_id": self.identity["container_id"]})
            self.registered = False


def write_parameters(task: Any, values: dict[str, Any]) -> None:
    """Every field as `Section/name` with its description and type, as the launch form shows them (one update)."""
    keys = {f"{cfg.field_section(n)}/{n}": n for n in cfg.field_names()}
    task.update_parameters(
        {key: values[n] for key, n in keys.items()},
        **{"__parameters_descriptions": {key: cfg.field_description(n) for key, n in keys.items()},
           "__parameters_types": {key: type(values[n]).__name__ for key, n in keys.items()}})


def _sections() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {s: [] for s in cfg.SECTIONS}
    for name in cfg.field_names():
        out[cfg.field_section(name)].append(name)
    return out


def clearml_model_copy(model_id: str) -> Optional[str]:
    """Download a ClearML model's file (no archive extraction) into ClearML's cache."""
    from clearml import InputModel

    try:
        model = InputModel(model_id=model_id)
        uri = model.url
    except AttributeError:
        # The SDK logs the server's refusal and then fails on the missing record.
        raise ValueError(f"no readable ClearML model with ID {model_id}") from None
    if not uri:
        raise ValueError(f"ClearML model {model_id} has no file (empty URI)")
    path = model.get_local_copy(extract_archive=False)
    return str(path) if path else None


def storage_copy(url: str) -> Optional[str]:
    """A local copy of an http(s)/s3/gs/azure URL through ClearML's storage manager (cached)."""
    from clearml import StorageManager

    path = StorageManager.get_local_copy(url, extract_archive=False)
    return str(path) if path else None


# --- instances: launch, clone, export (the SDK calls behind `python -m app.instances`) ----------------------

# Properties the app writes about itself; a clone must not show its source's.
APP_PROPERTIES = ("status", "App URL", "API base", "API key", "test command", "idle time (s)", "last action", "model")


@dataclass
class Launched:
    id: str
    url: str
    queue: str


def create_instance(config: cfg.AppConfig, project: str, name: str, repo: Optional[str], branch: Optional[str],
                    commit: Optional[str], requirements: str, queue: str) -> Launched:
    """A new app task running `python -m app` from this repository, its form filled in, enqueued."""
    from clearml import Task

    task: Any = Task.create(project_name=project, task_name=name, task_type="application", repo=repo, branch=branch,
                       commit=commit, module="app", working_directory=".", requirements_file=requirements,
                       add_task_init_call=False, detect_repository=repo is None)
    write_parameters(task, config.model_dump())
    return _enqueue(task, queue)


def clone_instance(source_id: str, edits: dict[str, Any], name: Optional[str], queue: str) -> Launched:
    """A copy of an instance with its configuration (plus edits), without its app-owned properties, enqueued."""
    from clearml import Task

    source: Any = Task.get_task(task_id=source_id)
    config = cfg.build({**cfg.from_strings(source.get_parameters() or {}), **edits})
    clone: Any = Task.clone(source_task=source, name=name or f"{source.name} (clone)")
    write_parameters(clone, config.model_dump())
    clone.delete_user_properties([("properties", name) for name in APP_PROPERTIES])
    return _enqueue(clone, queue)


def instance_config(task_id: str) -> cfg.AppConfig:
    """An instance's configuration, as its task's hyperparameters hold it (strings, cast and validated)."""
    from clearml import Task

    task: Any = Task.get_task(task_id=task_id)
    return cfg.build(cfg.from_strings(task.get_parameters() or {}))


def _enqueue(task: Any, queue: str) -> Launched:
    from clearml import Task

    Task.enqueue(task, queue_name=queue)
    return Launched(task.id, task.get_output_log_web_page(), queue)
