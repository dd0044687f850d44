"""A small in-process double of the ClearML REST API, for the SDK calls offline mode cannot make.

Named as a double: it stands in for a ClearML server only. Every request is
parsed with the SDK's own request classes (`clearml.backend_api.services`),
so a call the SDK would not make, or a malformed one, fails loudly here, and
replies are built with the SDK's own response classes. Files (model weights)
are served under /files/ the way a fileserver would.

Enough of a server for `python -m app` to run online against it, as under an agent: the task lifecycle
(`tasks.started/ping/stopped/completed/failed`), `tasks.edit` with runtime properties, console and scalar
events (`events.add_batch`, json-lines), the Model Endpoints calls (`serving.*`) and, on an "advanced"
(Enterprise) server, the AI Application Gateway: once a task asks for an external endpoint (runtime
`_SERVICE`/`_ADDRESS`/`_PORT` plus the system tag `external_service`), the double fills `endpoint` and
`browser_endpoint` as the router does. Gateway URLs use the reserved `.invalid` domain: nothing can reach
them. `outage` makes the whole server fail ("503") or stop answering ("hang") until it is cleared.
"""

from __future__ import annotations

import importlib
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import jwt

API_VERSION = "2.23"
SERVER_API_VERSION = "2.31"  # what the login token announces (open-source server 1.17+: Model Endpoints)

# The services the SDK has no schema for (the server's own: serving.conf, routers, users.get_vaults): the
# fields the server requires, checked here instead of the SDK's classes.
SERVER_ONLY: dict[str, set[str]] = {
    "serving.register_container": {"container_id", "endpoint_name", "model_name"},
    "serving.container_status_report": {"container_id", "endpoint_name", "model_name"},
    "serving.unregister_container": {"container_id"},
    "routers.get_routes": set(),
    "users.get_vaults": set(),
}
GATEWAY_TAG = "external_service"


@dataclass
class Call:
    endpoint: str
    body: dict[str, Any]


@dataclass
class ClearMLDouble:
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    handlers: dict[str, Callable[[Any], Any]] = field(default_factory=dict)
    projects: dict[str, str] = field(default_factory=dict)  # id -> name
    queues: dict[str, str] = field(default_factory=lambda: {"q-default": "default", "q-gpu": "gpu"})
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    enqueued: list[tuple[str, str]] = field(default_factory=list)  # (task id, queue id)
    feature_set: str = "basic"  # the login token's: "advanced" is an Enterprise server (gateway, static routes)
    server_version: str = ""  # empty: 1.17.0 for "basic", 3.26.0 (static routes) for "advanced"
    gateway_url: str = "https://gateway.double.invalid"
    routes: list[dict[str, Any]] = field(default_factory=list)  # routers.get_routes
    containers: dict[str, dict[str, Any]] = field(default_factory=dict)  # Model Endpoints rows by container_id
    unregistered: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)  # events.add_batch, one dict per event
    outage: str | None = None  # None, "503" (every call refused) or "hang" (no answer) until cleared
    released: threading.Event = field(default_factory=threading.Event)  # set: hung requests give up

    def add_model(self, model_id: str, name: str, file: Path, base_url: str) -> None:
        self.files[file.name] = file
        self.models[model_id] = {"id": model_id, "name": name, "uri": f"{base_url}/files/{file.name}",
                                 "framework": "GGUF", "ready": True}

    def endpoints(self) -> list[str]:
        return [c.endpoint for c in self.calls]

    def add_app_task(self, values: dict[str, Any], sections: dict[str, str], status: str = "in_progress") -> str:
        """A task as launched for an agent to run (its form filled in, `Section/name` strings), already started
        by the agent: `CLEARML_TASK_ID` for a process that plays the agent's child."""
        tid = self._new_id("t")
        hyper: dict[str, dict[str, Any]] = {}
        for name, value in values.items():
            section = sections[name]
            text = str(value)
            hyper.setdefault(section, {})[name] = {"section": section, "name": name, "value": text,
                                                   "type": type(value).__name__}
        self.tasks[tid] = {"id": tid, "name": "llama.cpp endpoint", "type": "application", "status": status,
                           "status_message": "", "project": self._project("llama.cpp Model Deployment"),
                           "hyperparams": hyper, "configuration": {}, "runtime": {}, "system_tags": [], "tags": [],
                           "script": {"entry_point": "-m app", "working_dir": "."}}
        return tid

    def abort(self, task_id: str) -> None:
        """What the web UI's Abort does to a task an agent runs: the status stays, the message says "stopping"."""
        self.tasks[task_id]["status_message"] = "stopping"

    def console(self, task_id: str) -> list[str]:
        """The task's console as the SDK sent it (events of type `log`)."""
        return [e.get("msg", "") for e in self.events if e.get("type") == "log" and e.get("task") == task_id]

    def scalars(self, task_id: str) -> list[dict[str, Any]]:
        """The task's scalar events (`metric` is the title, `variant` the series)."""
        return [e for e in self.events if e.get("type") == "training_stats_scalar" and e.get("task") == task_id]

    def properties(self, task_id: str) -> dict[str, str]:
        """User properties (hyperparameter section `properties`)."""
        section = self.tasks[task_id]["hyperparams"].get("properties", {})
        return {name: p.get("value", "") for name, p in section.items()}

    def token(self) -> str:
        version = self.server_version or ("3.26.0" if self.feature_set == "advanced" else "1.17.0")
        return jwt.encode({"api_version": SERVER_API_VERSION, "server_version": version,
                           "feature_set": self.feature_set, "exp": int(time.time()) + 3600,
                           "identity": {"user": "double", "company": "double"}},
                          "clearml-double-signing-key-0123456789", algorithm="HS256")

    def env(self, url: str) -> dict[str, str]:
        return {"CLEARML_API_HOST": url, "CLEARML_WEB_HOST": url, "CLEARML_FILES_HOST": url + "/files",
                "CLEARML_API_ACCESS_KEY": "double-key", "CLEARML_API_SECRET_KEY": "double-secret"}

    # --- request handling with the SDK's schema -----------------------------------------

    def handle(self, endpoint: str, body: Any) -> tuple[int, dict[str, Any]]:
        self.calls.append(Call(endpoint, body))
        if endpoint == "auth.login":
            return 200, {"token": self.token()}
        if endpoint in SERVER_ONLY:
            missing = SERVER_ONLY[endpoint] - set(body)
            if missing:
                return 400, {"__msg": f"{endpoint}: missing required field(s) {sorted(missing)}", "__subcode": 0}
            return getattr(self, "_" + endpoint.replace(".", "_"))(body)
        service, _, action = endpoint.partition(".")
        request_cls, response_cls = _classes(service, action)
        if isinstance(body, list):  # a batch (json-lines): each item must fit the batched request's schema
            items = [{k: v for k, v in item.items() if k != "method"} for item in body]
            for item in items:
                jsonschema.validate(item, request_cls._batched_request_cls._schema)
            return 200, response_cls.from_dict(getattr(self, "_" + endpoint.replace(".", "_"))(items)).to_dict()
        # "method" is the SDK's transport field, not part of the schema; everything else must fit it.
        request = request_cls.from_dict({k: v for k, v in body.items() if k != "method"})
        if endpoint in self.handlers:
            return 200, self.handlers[endpoint](request)
        store = getattr(self, "_" + endpoint.replace(".", "_"), None)
        if store is not None:
            result = store(body)
            if isinstance(result, tuple):
                return result
            return 200, response_cls.from_dict(result).to_dict()
        if endpoint == "models.get_by_id":
            model = self.models.get(request.model)
            if model is None:
                return 400, {"__msg": f"Invalid model id: {request.model}", "__subcode": 201}
            module = importlib.import_module(f"clearml.backend_api.services.v{API_VERSION.replace('.', '_')}.models")
            return 200, response_cls(model=module.Model(**model)).to_dict()
        return 400, {"__msg": f"the double does not implement {endpoint}", "__subcode": 0}

    # --- a small task store: what launching, cloning and exporting need ------------------------

    def queue_id(self, name: str) -> str | None:
        return next((qid for qid, qname in self.queues.items() if qname == name), None)

    def _now(self) -> str:
        """A creation time, one millisecond after the last one (ordering stays exact however fast tasks come)."""
        self._clock = max(getattr(self, "_clock", 0.0) + 0.001, time.time())
        millis = int(self._clock * 1000) % 1000
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self._clock)) + f".{millis:03d}000+00:00"

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{len(self.tasks) + len(self.projects) + 1:030d}"[-32:]

    def _projects_get_all(self, body: dict[str, Any]) -> dict[str, Any]:
        pattern = body.get("name")
        found = [{"id": pid, "name": name} for pid, name in self.projects.items()
                 if pattern is None or re.fullmatch(pattern.strip("^$").replace("\\", ""), name)
                 or re.match(pattern, name)]
        return {"projects": found}

    def _projects_create(self, body: dict[str, Any]) -> dict[str, Any]:
        pid = self._new_id("p")
        self.projects[pid] = body["name"]
        return {"id": pid}

    def _queues_get_all(self, body: dict[str, Any]) -> dict[str, Any]:
        pattern = body.get("name")
        return {"queues": [{"id": qid, "name": name} for qid, name in self.queues.items()
                           if pattern is None or re.match(pattern, name)]}

    def _tasks_create(self, body: dict[str, Any]) -> dict[str, Any]:
        tid = self._new_id("t")
        task = {k: v for k, v in body.items() if k != "method"}
        task.update(id=tid, status="created", hyperparams=task.get("hyperparams") or {},
                    configuration=task.get("configuration") or {}, runtime={}, created=self._now())
        self.tasks[tid] = task
        return {"id": tid}

    def _task_view(self, task: dict[str, Any]) -> dict[str, Any]:
        allowed = {"id", "name", "type", "status", "status_message", "status_reason", "project", "comment", "script",
                   "hyperparams", "configuration", "execution", "tags", "system_tags", "parent", "runtime",
                   "container", "output", "created"}
        return {k: v for k, v in task.items() if k in allowed}

    def _tasks_get_all(self, body: dict[str, Any]) -> dict[str, Any]:
        ids = body.get("id")
        ids = [ids] if isinstance(ids, str) else ids
        tags = body.get("tags") or []
        statuses = body.get("status") or []
        statuses = [statuses] if isinstance(statuses, str) else statuses
        found = [self._task_view(t) for t in self.tasks.values()
                 if (not ids or t["id"] in ids) and all(tag in (t.get("tags") or []) for tag in tags)
                 and (not statuses or t["status"] in statuses)]
        return {"tasks": found}

    def _tasks_dequeue(self, body: dict[str, Any]) -> Any:
        task = self.tasks.get(body["task"])
        if task is None or task["status"] != "queued":
            return 400, {"__msg": "Invalid task status (task is not queued)", "__subcode": 110}
        self.enqueued = [(tid, q) for tid, q in self.enqueued if tid != task["id"]]
        task["status"] = "created"
        return {"dequeued": 1, "updated": 1, "fields": {"status": "created"}}

    def _tasks_stop(self, body: dict[str, Any]) -> Any:
        """As the server's stop: a queued task leaves its queue and is stopped; a running one with a worker keeps
        its status and gets the message "stopping" (the UI's abort: its SDK runs the abort callback); otherwise
        (or forced) it is stopped."""
        task = self.tasks.get(body["task"])
        if task is None:
            return 400, {"__msg": f"Invalid task id: {body['task']}", "__subcode": 101}
        if task["status"] == "in_progress" and not body.get("force"):
            task["status_message"] = "stopping"
        else:
            self.enqueued = [(tid, q) for tid, q in self.enqueued if tid != task["id"]]
            task.update(status="stopped", status_message=body.get("status_message") or "")
        return {"updated": 1, "fields": {"status": task["status"]}}

    def _tasks_get_by_id(self, body: dict[str, Any]) -> Any:
        task = self.tasks.get(body["task"])
        if task is None:
            return 400, {"__msg": f"Invalid task id: {body['task']}", "__subcode": 101}
        return {"task": self._task_view(task)}

    def _tasks_edit(self, body: dict[str, Any]) -> dict[str, Any]:
        task = self.tasks[body["task"]]
        for key, value in body.items():
            if key not in ("task", "force", "method"):
                task[key] = value
        self._after_edit(task)
        return {"updated": 1, "fields": {}}

    def _tasks_edit_hyper_params(self, body: dict[str, Any]) -> dict[str, Any]:
        task = self.tasks[body["task"]]
        if body.get("replace_hyperparams") == "all":
            task["hyperparams"] = {}
        for p in body.get("hyperparams", []):
            section = task["hyperparams"].setdefault(p["section"], {})
            section[p["name"]] = {k: v for k, v in p.items()}
        return {"updated": 1}

    def _tasks_get_hyper_params(self, body: dict[str, Any]) -> dict[str, Any]:
        out = []
        for tid in body["tasks"]:
            params = [v for section in self.tasks[tid]["hyperparams"].values() for v in section.values()]
            out.append({"task": tid, "hyperparams": params})
        return {"params": out}

    def _tasks_delete_hyper_params(self, body: dict[str, Any]) -> dict[str, Any]:
        task = self.tasks[body["task"]]
        for p in body.get("hyperparams", []):
            task["hyperparams"].get(p["section"], {}).pop(p.get("name"), None)
        return {"deleted": 1}

    def _tasks_clone(self, body: dict[str, Any]) -> dict[str, Any]:
        source = self.tasks[body["task"]]
        tid = self._new_id("t")
        clone = json.loads(json.dumps(source))
        clone.update(id=tid, status="created", parent=source["id"], created=self._now())
        if body.get("new_task_name"):
            clone["name"] = body["new_task_name"]
        self.tasks[tid] = clone
        return {"id": tid, "new_project": None}

    def _tasks_enqueue(self, body: dict[str, Any]) -> dict[str, Any]:
        task = self.tasks[body["task"]]
        task["status"] = "queued"
        self.enqueued.append((task["id"], body["queue"]))
        return {"queued": 1, "updated": 1, "fields": {}}

    # --- what a running task calls: lifecycle, runtime properties, events --------------------------

    def _project(self, name: str) -> str:
        pid = next((p for p, n in self.projects.items() if n == name), None)
        if pid is None:
            pid = self._new_id("p")
            self.projects[pid] = name
        return pid

    def _projects_get_by_id(self, body: dict[str, Any]) -> Any:
        name = self.projects.get(body["project"])
        if name is None:
            return 400, {"__msg": f"Invalid project id: {body['project']}", "__subcode": 401}
        return {"project": {"id": body["project"], "name": name}}

    def _set_status(self, body: dict[str, Any], status: str) -> Any:
        task = self.tasks.get(body["task"])
        if task is None:
            return 400, {"__msg": f"Invalid task id: {body['task']}", "__subcode": 101}
        task.update(status=status, status_message=body.get("status_message") or "",
                    status_reason=body.get("status_reason") or "")
        return {"updated": 1, "fields": {"status": status}}

    def _tasks_started(self, body: dict[str, Any]) -> Any:
        return self._set_status(body, "in_progress")

    def _tasks_stopped(self, body: dict[str, Any]) -> Any:
        return self._set_status(body, "stopped")

    def _tasks_completed(self, body: dict[str, Any]) -> Any:
        return self._set_status(body, "completed")

    def _tasks_failed(self, body: dict[str, Any]) -> Any:
        return self._set_status(body, "failed")

    def _tasks_ping(self, body: dict[str, Any]) -> dict[str, Any]:
        return {}

    def _tasks_set_requirements(self, body: dict[str, Any]) -> Any:
        task = self.tasks.get(body["task"])
        if task is None:
            return 400, {"__msg": f"Invalid task id: {body['task']}", "__subcode": 101}
        task.setdefault("script", {})["requirements"] = body.get("requirements") or {}
        return {"updated": 1, "fields": {}}

    def _events_add_batch(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        self.events.extend(items)
        return {"added": len(items), "errors": 0}

    def _after_edit(self, task: dict[str, Any]) -> None:
        """The router's part: a task that asked for an external HTTP endpoint gets one."""
        runtime = task.get("runtime") or {}
        asked = runtime.get("_SERVICE") == "EXTERNAL" and runtime.get("_ADDRESS") and runtime.get("_PORT")
        if asked and GATEWAY_TAG in (task.get("system_tags") or []) and not runtime.get("endpoint"):
            route = runtime.get("_ROUTER_ENDPOINT_MODE_PARAM") or task["id"]
            runtime["endpoint"] = f"{self.gateway_url}/{route}/"
            runtime["browser_endpoint"] = f"{self.gateway_url}/{route}/?browser=1"

    # --- services the SDK has no schema for: the server's own ---------------------------------------

    def _serving_register_container(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.containers[body["container_id"]] = dict(body)
        return 200, {}

    def _serving_container_status_report(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if not isinstance(body.get("latency_ms", 0), int):
            return 400, {"__msg": "latency_ms must be an integer", "__subcode": 0}
        if body["container_id"] not in self.containers:
            return 400, {"__msg": "container not registered", "__subcode": 0}
        self.containers[body["container_id"]].update(body)
        return 200, {}

    def _serving_unregister_container(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.containers.pop(body["container_id"], None)
        self.unregistered.append(body["container_id"])
        return 200, {}

    def _routers_get_routes(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if self.feature_set != "advanced":
            return 400, {"__msg": "Enterprise license required", "__subcode": 0}
        pattern = body.get("name")
        return 200, {"routes": [r for r in self.routes if pattern is None or re.match(pattern, r["name"])]}

    def _users_get_vaults(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return 200, {"vaults": []}

    def serve(self) -> RunningDouble:
        return RunningDouble(self)


def _classes(service: str, action: str) -> tuple[Any, Any]:
    module = importlib.import_module(f"clearml.backend_api.services.v{API_VERSION.replace('.', '_')}.{service}")
    request_cls = response_cls = None
    for value in vars(module).values():
        if getattr(value, "_service", None) == service and getattr(value, "_action", None) == action:
            if value.__name__.endswith("Request"):
                request_cls = value
            elif value.__name__.endswith("Response"):
                response_cls = value
    if request_cls is None or response_cls is None:
        raise KeyError(f"no SDK schema for {service}.{action}")
    return request_cls, response_cls


class RunningDouble:
    def __init__(self, double: ClearMLDouble) -> None:
        self.double = double
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(double))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> RunningDouble:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.double.released.set()  # hung requests give up
        self.server.shutdown()
        self.server.server_close()


def _handler(double: ClearMLDouble) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            return

        def do_GET(self) -> None:
            self._serve()

        def do_POST(self) -> None:
            self._serve()

        def _serve(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            path = self.path.split("?", 1)[0]
            if path.startswith("/files/"):
                self._file(path[len("/files/"):])
                return
            endpoint = path.rsplit("/", 1)[-1]
            if double.outage == "hang":
                while double.outage == "hang" and not double.released.wait(0.1):
                    pass
            if double.outage == "503":
                status, data = 503, {"__msg": "the double is down", "__subcode": 0}
            else:
                status, data = self._answer(endpoint, raw)
            self._reply(endpoint, status, data)

        def _answer(self, endpoint: str, raw: bytes) -> tuple[int, dict[str, Any]]:
            try:
                body: Any = {}
                if raw:
                    try:
                        body = json.loads(raw)
                    except json.JSONDecodeError:  # a batch: one JSON object per line
                        body = [json.loads(line) for line in raw.splitlines() if line.strip()]
                    if endpoint.endswith("add_batch") and isinstance(body, dict):
                        body = [body]
                return double.handle(endpoint, body)
            except Exception as exc:  # a schema violation: the SDK sent what a server would refuse
                return 400, {"__msg": f"{type(exc).__name__}: {exc}", "__subcode": 0}

        def _reply(self, endpoint: str, status: int, data: dict[str, Any]) -> None:
            meta = {"id": "double", "trx": "double", "result_code": status,
                    "result_subcode": data.pop("__subcode", 0) if status != 200 else 0,
                    "result_msg": data.pop("__msg", "OK") if status != 200 else "OK", "error_stack": "",
                    "endpoint": {"name": endpoint, "requested_version": API_VERSION, "actual_version": API_VERSION}}
            out = json.dumps({"meta": meta, "data": data if status == 200 else {}},
                         default=lambda o: o.isoformat()).encode()  # datetimes (a task's created)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def _file(self, name: str) -> None:
            source: Path | None = double.files.get(name)
            double.calls.append(Call("files.download", {"name": name}))
            if source is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            size = source.stat().st_size
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            with open(source, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    self.wfile.write(chunk)

    return Handler
