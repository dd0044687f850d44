"""The ClearML REST double, extended with what `clearml-agent execute` itself calls.

Named as a double: it stands in for a ClearML server only. The base (`tests/clearml_double.py`) covers the
SDK's calls (task store, lifecycle, events, `serving.*`); this subclass adds the agent's own: taking the task
off its queue (`tasks.dequeue`), the environment it installed (`tasks.set_requirements`) and the worker's
reports (`workers.*`). Requests are still parsed with the SDK's request classes (clearml 2.1.12, API 2.23);
clearml-agent 3.0.3 sends them from its own, older copy of the schema (`clearml_agent/backend_api/services`,
v2_4 and v2_5), whose fields for these calls are a subset of the SDK's.

Where the agent sends what the SDK's schema refuses but clearml-server takes, the double follows the server,
and says so here (every other field is still checked by the SDK's classes):
- IDs are 32 hex digits. `clearml-agent execute --id X` takes anything else for a task *name* and searches.
- `events.add_batch` lines are stored without a per-line schema check (clearml-server checks a request's
  schema on non-batched data only, and `events.add_batch` declares no data model); the agent sends its
  console lines with `level: "DEBUG"`, outside the schema's lower-case enum. The level is lower-cased before
  the base's per-line check.
- `workers.status_report`: the server reads `machine_stats` with its own model (apiserver/apimodels/workers.py,
  `FloatField`s), the SDK's schema says integer MB for memory, disk and network, and the agent sends floats.
  Those are rounded before the SDK's class reads them.

Every refused call is kept in `refused` (endpoint, reason), so a test can say what the double would not take.
"""

from __future__ import annotations

import importlib
import uuid
from dataclasses import dataclass, field
from typing import Any

from tests.clearml_double import API_VERSION, ClearMLDouble


def _integer_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """`machine_stats` with the fields the SDK's schema types as integers rounded (the server takes floats)."""
    module = importlib.import_module(f"clearml.backend_api.services.v{API_VERSION.replace('.', '_')}.workers")
    schema = module.StatusReportRequest._schema["definitions"]["machine_stats"]["properties"]

    def is_int(name: str) -> bool:
        spec = schema.get(name, {})
        return "integer" in spec.get("type", []) or spec.get("items", {}).get("type") == "integer"

    def rounded(value: Any) -> Any:
        if isinstance(value, list):
            return [rounded(v) for v in value]
        return round(value) if isinstance(value, float) else value

    return {name: rounded(value) if is_int(name) else value for name, value in stats.items()}


@dataclass
class AgentDouble(ClearMLDouble):
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)  # worker id -> its last status report
    unregistered_workers: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)

    def handle(self, endpoint: str, body: Any) -> tuple[int, dict[str, Any]]:
        if endpoint == "events.add_batch" and isinstance(body, list):
            body = [{**item, "level": item["level"].lower()} if isinstance(item.get("level"), str) else item
                    for item in body]
        if endpoint == "workers.status_report" and isinstance(body.get("machine_stats"), dict):
            body = {**body, "machine_stats": _integer_stats(body["machine_stats"])}
        try:
            status, data = super().handle(endpoint, body)
        except Exception as exc:  # a schema violation: answered 400 by the server loop
            self.refused.append((endpoint, f"{type(exc).__name__}: {exc}"))
            raise
        if status != 200:
            self.refused.append((endpoint, str(data.get("__msg", status))))
        return status, data

    def _new_id(self, prefix: str) -> str:
        return uuid.uuid4().hex

    def status_reports(self, container_id: str) -> list[dict[str, Any]]:
        """The Model Endpoints status reports this container sent, oldest first."""
        return [c.body for c in self.calls
                if c.endpoint == "serving.container_status_report" and c.body.get("container_id") == container_id]

    # --- the agent's own task calls ----------------------------------------------------------

    def _tasks_dequeue(self, body: dict[str, Any]) -> Any:
        """Off its queue, into `new_status` (the agent asks for `in_progress`, then calls `tasks.started`)."""
        task = self.tasks.get(body["task"])
        if task is None:
            return 400, {"__msg": f"Invalid task id: {body['task']}", "__subcode": 101}
        if task["status"] != "queued":
            return {"dequeued": 0, "updated": 0, "fields": {}}
        self.enqueued = [(tid, qid) for tid, qid in self.enqueued if tid != task["id"]]
        task["status"] = body.get("new_status") or "created"
        return {"dequeued": 1, "updated": 1, "fields": {"status": task["status"]}}

    def _tasks_set_requirements(self, body: dict[str, Any]) -> Any:
        """What the agent installed, beside what the task asked for (`org_pip`)."""
        task = self.tasks.get(body["task"])
        if task is None:
            return 400, {"__msg": f"Invalid task id: {body['task']}", "__subcode": 101}
        script = task.setdefault("script", {})
        script["requirements"] = {**(script.get("requirements") or {}), **(body.get("requirements") or {})}
        return {"updated": 1, "fields": {}}

    # --- the worker ----------------------------------------------------------------------------

    def _workers_status_report(self, body: dict[str, Any]) -> dict[str, Any]:
        self.workers[body["worker"]] = {k: v for k, v in body.items() if k != "method"}
        return {}

    def _workers_unregister(self, body: dict[str, Any]) -> dict[str, Any]:
        self.workers.pop(body["worker"], None)
        self.unregistered_workers.append(body["worker"])
        return {}
