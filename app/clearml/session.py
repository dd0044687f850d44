"""The app's ClearML task: start-up, configuration, properties, scalars, console, gateway, abort and close.

Every call that reaches ClearML goes through `AppTask`, which catches and logs failures so reporting can never
take serving down. Each channel (properties, scalars, Model Endpoints calls, control) backs off on its own: a
failing `serving.*` call never silences scalars or properties. The outage is logged once, and its end once.

The SDK retries an unreachable server for hours (a 503 "maintenance" forever), so nothing that matters waits on
it: property updates (status changes happen on uvicorn's event loop) go through the outbox thread, merged while
one is on its way, and the last words at shutdown (unregister, final properties, close) get one time budget.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from app import config as cfg

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "llama.cpp Model Deployment"
DEFAULT_TASK_NAME = "llama.cpp endpoint"
SERVING_API_VERSION = "2.31"
RETRY_BASE_S = 5.0  # first retry after an outage starts; doubles up to RETRY_MAX_S
RETRY_MAX_S = 300.0
OUTBOX_POLL_S = 1.0  # how often the outbox looks again at updates kept back by a backoff
CLOSE_BUDGET_S = 20.0  # the shutdown's ClearML calls together; past it the process exits without them


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
        self._pending: dict[str, str] = {}  # property updates not yet sent, newest values
        self._shown: dict[str, str] = {}  # offline: every property sent so far (see _send_pending)
        self._pending_lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._outbox: threading.Thread | None = None  # None: updates are sent by the caller (unit tests)
        self.abandoned = False  # the shutdown's calls ran out of time: leave without the SDK's exit hook

    # --- start-up ------------------------------------------------------------------

    @classmethod
    def start(cls, offline: bool, project: str, name: str,
              backlog: Callable[[], Sequence[str]] = tuple) -> AppTask:
        """The task, its console fed from now on with our log and, first, `backlog()`: the lines logged before
        (on a local run the model starts loading before ClearML)."""
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
        if not app_task.running_remotely:
            # The console is our log, forwarded record by record: nothing lost at a quick exit. Under an agent the
            # agent forwards the process's own output, and the SDK would send WARNING and above a second time.
            handler = TaskLogHandler(task)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            handler.replay(backlog())
            logging.getLogger().addHandler(handler)
            app_task._log_handler = handler
        app_task.start_outbox()
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
        """Queue the update for the outbox (never waits on ClearML); without the outbox, send it now."""
        with self._pending_lock:
            self._pending.update({k: ("" if v is None else str(v)) for k, v in properties.items()})
        if self._outbox is None:
            return self._send_pending()
        self._wake.set()
        return True

    def _send_pending(self, force: bool = False) -> bool:
        """Send the queued updates in one call; kept (under newer values) for a later try when it fails."""
        with self._pending_lock:
            props, self._pending = self._pending, {}
        if not props and not (force and self._shown):
            return True

        if self.offline:
            # The SDK's repository-detection thread reloads the offline task from its file and saves it again,
            # racing our read-modify-write of the properties: an update made in between is lost. Sending every
            # property each time puts it back with the next update, and the last update is made at close.
            self._shown.update(props)
            props = dict(self._shown)

        def update() -> None:
            self.task.set_user_properties(**props)
            if "status" in props and not self.offline:
                set_runtime_status(self.task, props["status"])
        sent = self._guard("properties", "property update", update, force=force)
        if not sent:
            with self._pending_lock:
                self._pending = {**props, **self._pending}
        return sent

    def start_outbox(self) -> None:
        self._outbox = threading.Thread(target=self._run_outbox, name="clearml-outbox", daemon=True)
        self._outbox.start()

    def _run_outbox(self) -> None:
        while not self._closing.is_set():
            self._wake.wait(OUTBOX_POLL_S)
            self._wake.clear()
            if not self._closing.is_set():
                self._send_pending()

    def report_scalar(self, title: str, series: str, value: float, iteration: int) -> bool:
        return self._guard("scalars", "scalar report",
                           lambda: self.task.get_logger().report_scalar(title, series, float(value), iteration))

    def register_abort(self, request_stop: Callable[[], None], finished: threading.Event, wait_s: float) -> None:
        """An abort from the web UI takes the shutdown path: ask for the stop, then wait (at most `wait_s`) until
        `finished` says the run is over (drained, unregistered, `stopped`, task closed).

        The SDK kills the process about 2 s after its abort callback returns, so the callback must outlast the
        shutdown; once the task is closed the SDK's own kill stands down and the process exits with its own code.
        """
        if self.offline:
            # Offline, ClearML's status poll reads the task as reset and would terminate us.
            return

        def on_abort() -> None:
            log.info("abort requested from the ClearML UI")
            request_stop()
            if not finished.wait(wait_s):
                log.warning("shutdown still running %.0f s after the abort: ClearML ends the process now", wait_s)

        # The SDK kills a callback still running at its timeout: give ours room to return by itself.
        self._guard("control", "abort callback registration",
                    lambda: self.task.register_abort_callback(on_abort, callback_execution_timeout=wait_s + 5.0))

    # --- AI Application Gateway (Enterprise servers) ------------------------------------

    def request_external_endpoint(self, port: int, static_route: str | None, wait_s: float) -> dict[str, Any] | None:
        """The gateway's route to `port`: the SDK's dict with `endpoint` (API clients) and `browser_endpoint`,
        or None when the router assigned none within `wait_s`. Raises ValueError on a server without the
        gateway (the SDK checks the login token's feature set first), or for a static route it refuses."""
        assigned = self.task.request_external_endpoint(port, protocol="http", wait=True,
                                                       wait_timeout_seconds=wait_s, static_route=static_route)
        return dict(assigned) if assigned else None

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

    def close(self, before: Callable[[], Any] | None = None, failure: str | None = None,
              budget_s: float = CLOSE_BUDGET_S) -> bool:
        """The last words, in order, within `budget_s` altogether: `before` (unregistering), the queued
        properties, the failure (`failure` marks the task failed), then the SDK's close (which flushes events).

        False when ClearML did not answer in time: then `abandoned` is set, and the caller should exit without
        the SDK's exit hook, which would retry the unreachable server for hours.
        """
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
        self._closing.set()
        self._wake.set()

        def last_words() -> None:
            if self._outbox is not None:
                self._outbox.join()  # an update on its way lands first: ours must not be overwritten by it
            if before is not None:
                before()
            self._send_pending(force=True)
            if failure is not None and not self.offline:
                self._guard("control", "failure report",
                            lambda: self.task.mark_failed(status_reason=failure, status_message=failure), force=True)
            if self._guard("control", "close", self.task.close, force=True):
                log.info("ClearML task closed")

        closer = threading.Thread(target=last_words, name="clearml-close", daemon=True)
        closer.start()
        closer.join(budget_s)
        if closer.is_alive():
            self.abandoned = True
            log.warning("ClearML did not answer within %.0f s: exiting without closing the task", budget_s)
            return False
        return True


class TaskLogHandler(logging.Handler):
    """Sends log records to the task's console; a failure here is dropped, never raised."""

    def __init__(self, task: Any) -> None:
        super().__init__(level=logging.INFO)
        self._logger = task.get_logger()
        self._inside = threading.local()

    def replay(self, lines: Sequence[str]) -> None:
        """Lines logged before the task existed (the model load starts before ClearML on a local run)."""
        for line in lines:
            try:
                self._logger.report_text(line, print_console=False)
            except Exception:
                return

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
