"""The app's ClearML task: start-up, configuration, properties, scalars, console, abort and close.

Every call that reaches ClearML goes through `AppTask`, which catches and logs failures so reporting can never
take serving down. Each channel (properties, scalars, Model Endpoints calls, control) backs off on its own: a
failing `serving.*` call never silences scalars or properties. The outage is logged once, and its end once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def private_host() -> str:
    """The address other machines reach this one at, as the SDK itself picks it: the agent's declared host IP,
    else the private IP of the default route (gethostbyname(gethostname()) is 127.0.1.1 on Debian)."""
    declared = os.environ.get("CLEARML_AGENT_HOST_IP")
    if declared:
        return declared
    try:
        from clearml.utilities.networking import get_private_ip

        return str(get_private_ip())
    except Exception:  # no route, no SDK: loopback is still truthful for a local run
        return "127.0.0.1"


# --- private SDK switches: the only two, each where no public call exists ---------------------------------------

def disable_report_subprocess() -> None:
    """Report from this process: the SDK's reporter subprocess makes every exit wait ~10 s (FACTS.md), and no
    public `Task.init` argument turns it off."""
    from clearml import Task

    Task._report_subprocess_enabled = False  # type: ignore[assignment]


def set_runtime_status(task: Any, status: str) -> None:
    """The status as a runtime property too, where the server shows those; the SDK has no public setter."""
    task._set_runtime_properties({"status": status})


class Backoff:
    """One channel's retry clock: after a failure, the next try waits base, 2×base, … up to RETRY_MAX_S."""

    def __init__(self, base_s: float) -> None:
        self.base_s = base_s
        self.failing = False
        self._delay_s = base_s
        self._retry_at = 0.0

    def may_try(self, now: float) -> bool:
        return not self.failing or now >= self._retry_at

    def failed(self, now: float) -> None:
        self._delay_s = min(self._delay_s * 2, RETRY_MAX_S) if self.failing else self.base_s
        self.failing = True
        self._retry_at = now + self._delay_s

    def succeeded(self) -> None:
        self.failing = False
        self._delay_s = self.base_s

class AppTask:
    """A thin, failure-tolerant wrapper around the ClearML task of this app instance."""

    CHANNELS = ("properties", "scalars", "serving", "control")

    def __init__(self, task: Any, offline: bool, retry_base_s: float = RETRY_BASE_S) -> None:
        self.task = task
        self.offline = offline
        self._backoff = {name: Backoff(retry_base_s) for name in self.CHANNELS}
        self._outage = False
        self._lock = threading.Lock()
        self._log_handler: logging.Handler | None = None

    # --- start-up ------------------------------------------------------------------

    @classmethod
    def start(cls, offline: bool, project: str, name: str) -> AppTask:
        from clearml import Task

        under_agent = bool(os.environ.get("CLEARML_TASK_ID"))
        if not offline and not under_agent and not has_credentials():
            log.warning("no ClearML server is configured (clearml-init / CLEARML_API_*): running in offline mode")
            offline = True
        if offline:
            Task.set_offline(True)
        disable_report_subprocess()
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

    def _guard(self, channel: str, what: str, fn: Callable[[], Any], force: bool = False) -> bool:
        """Run one ClearML call; while its channel is failing, try again only after that channel's backoff."""
        backoff = self._backoff[channel]
        now = time.monotonic()
        if not force and not backoff.may_try(now):
            return False  # still backing off: do not hammer a server that is down
        try:
            fn()
        except Exception as exc:  # ClearML down or refusing: serving goes on
            with self._lock:
                backoff.failed(now)
                first = not self._outage
                self._outage = True
            if first:
                log.warning("ClearML %s failed (%s); serving continues, retrying with backoff", what, exc)
            return False
        with self._lock:
            backoff.succeeded()
            recovered = self._outage and not any(b.failing for b in self._backoff.values())
            if recovered:
                self._outage = False
        if recovered:
            log.info("ClearML reporting recovered")
        return True

    def set_properties(self, **properties: Any) -> bool:
        props = {k: ("" if v is None else str(v)) for k, v in properties.items()}

        def update() -> None:
            self.task.set_user_properties(**props)
            if "status" in props and not self.offline:
                set_runtime_status(self.task, props["status"])
        return self._guard("properties", "property update", update)

    def report_scalar(self, title: str, series: str, value: float, iteration: int) -> bool:
        return self._guard("scalars", "scalar report",
                           lambda: self.task.get_logger().report_scalar(title, series, float(value), iteration))

    def register_abort(self, callback: Callable[[], None]) -> None:
        if self.offline:
            # Offline, ClearML's status poll reads the task as reset and would terminate us.
            return
        self._guard("control", "abort callback registration", lambda: self.task.register_abort_callback(callback))

    def mark_failed(self, cause: str) -> None:
        if not self.offline:
            self._guard("control", "failure report",
                        lambda: self.task.mark_failed(status_reason=cause, status_message=cause), force=True)

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
        return self._guard("serving", f"serving.{action}", call)

    def close(self) -> None:
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
        self._guard("control", "close", self.task.close, force=True)


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
