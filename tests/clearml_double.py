"""A small in-process double of the ClearML REST API, for the SDK calls offline mode cannot make.

Named as a double: it stands in for a ClearML server only. Every request is
parsed with the SDK's own request classes (`clearml.backend_api.services`),
so a call the SDK would not make, or a malformed one, fails loudly here, and
replies are built with the SDK's own response classes. Files (model weights)
are served under /files/ the way a fileserver would.
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

import jwt

API_VERSION = "2.23"


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

    def add_model(self, model_id: str, name: str, file: Path, base_url: str) -> None:
        self.files[file.name] = file
        self.models[model_id] = {"id": model_id, "name": name, "uri": f"{base_url}/files/{file.name}",
                                 "framework": "GGUF", "ready": True}

    def endpoints(self) -> list[str]:
        return [c.endpoint for c in self.calls]

    def env(self, url: str) -> dict[str, str]:
        return {"CLEARML_API_HOST": url, "CLEARML_WEB_HOST": url, "CLEARML_FILES_HOST": url + "/files",
                "CLEARML_API_ACCESS_KEY": "double-key", "CLEARML_API_SECRET_KEY": "double-secret"}

    # --- request handling with the SDK's schema -----------------------------------------

    def handle(self, endpoint: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.calls.append(Call(endpoint, body))
        if endpoint == "auth.login":
            token = jwt.encode({"api_version": "2.31", "server_version": "1.17.0", "feature_set": "basic",
                                "exp": int(time.time()) + 3600, "identity": {"user": "double", "company": "double"}},
                               "clearml-double-signing-key-0123456789", algorithm="HS256")
            return 200, {"token": token}
        service, _, action = endpoint.partition(".")
        request_cls, response_cls = _classes(service, action)
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
                    configuration=task.get("configuration") or {}, runtime={})
        self.tasks[tid] = task
        return {"id": tid}

    def _task_view(self, task: dict[str, Any]) -> dict[str, Any]:
        allowed = {"id", "name", "type", "status", "project", "comment", "script", "hyperparams", "configuration",
                   "execution", "tags", "system_tags", "parent", "runtime", "container", "output"}
        return {k: v for k, v in task.items() if k in allowed}

    def _tasks_get_all(self, body: dict[str, Any]) -> dict[str, Any]:
        ids = body.get("id")
        ids = [ids] if isinstance(ids, str) else ids
        found = [self._task_view(t) for t in self.tasks.values() if not ids or t["id"] in ids]
        return {"tasks": found}

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
        clone.update(id=tid, status="created", parent=source["id"])
        if body.get("new_task_name"):
            clone["name"] = body["new_task_name"]
        self.tasks[tid] = clone
        return {"id": tid, "new_project": None}

    def _tasks_enqueue(self, body: dict[str, Any]) -> dict[str, Any]:
        task = self.tasks[body["task"]]
        task["status"] = "queued"
        self.enqueued.append((task["id"], body["queue"]))
        return {"queued": 1, "updated": 1, "fields": {}}

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
            try:
                body = json.loads(raw) if raw else {}
                status, data = double.handle(endpoint, body)
            except Exception as exc:  # a schema violation: the SDK sent what a server would refuse
                status, data = 400, {"__msg": f"{type(exc).__name__}: {exc}", "__subcode": 0}
            meta = {"id": "double", "trx": "double", "result_code": status,
                    "result_subcode": data.pop("__subcode", 0) if status != 200 else 0,
                    "result_msg": data.pop("__msg", "OK") if status != 200 else "OK", "error_stack": "",
                    "endpoint": {"name": endpoint, "requested_version": API_VERSION, "actual_version": API_VERSION}}
            out = json.dumps({"meta": meta, "data": data if status == 200 else {}}).encode()
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
