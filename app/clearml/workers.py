"""The ClearML side of llama.cpp RPC workers: the worker's own task, its leader's state, and the leader's wait
for the endpoints its workers publish."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

WORKER_SECTION = "RPC Worker"
ENDPOINT_PROPERTY = "RPC endpoint"
FREE_MEMORY_PROPERTY = "Free memory (MiB)"
LEADER_ENDED = ("stopped", "completed", "failed", "closed", "published", "unknown")


def leader_status(leader_id: str) -> str | None:
    """The leader task's status (`in_progress`, `queued`, `stopped`, ...), or None when ClearML cannot be asked
    right now (an outage is not a stop)."""
    from clearml import Task

    try:
        task: Any = Task.get_task(task_id=leader_id)
        return str(task.get_status())
    except ValueError:  # no such task (deleted): the leader is gone
        return "unknown"
    except Exception as exc:  # the server is unreachable: ask again later
        log.warning("could not read the leader task's status: %s", exc)
        return None


def worker_endpoints(task_ids: list[str], timeout_s: float,
                     progress: Callable[[str], None] = lambda line: None) -> list[str]:
    """The `host:port` each worker task publishes once its RPC server listens, in the order of `task_ids`; waits
    up to `timeout_s` (the workers are queued like any task: an agent must take them first). TimeoutError names
    the workers that never published."""
    from clearml import Task

    found: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    announced = 0.0
    while True:
        for task_id in task_ids:
            if task_id in found:
                continue
            try:
                task: Any = Task.get_task(task_id=task_id)
            except ValueError:
                raise RuntimeError(f"RPC worker task {task_id} does not exist") from None
            status = str(task.get_status())
            if status in ("failed", "stopped", "completed", "closed"):
                raise RuntimeError(f"RPC worker task {task_id} is {status}: it cannot serve this leader")
            value = (task.get_user_properties() or {}).get(ENDPOINT_PROPERTY)
            endpoint = value.get("value") if isinstance(value, dict) else value
            if endpoint:
                found[task_id] = str(endpoint)
                progress(f"RPC worker {task_id} serves at {endpoint}")
        if len(found) == len(task_ids):
            return [found[t] for t in task_ids]
        now = time.monotonic()
        if now >= deadline:
            missing = ", ".join(t for t in task_ids if t not in found)
            raise TimeoutError(f"RPC worker task(s) {missing} published no endpoint within {timeout_s:.0f} s "
                               "(is an agent serving their queue?)")
        if now - announced > 30:
            progress(f"waiting for {len(task_ids) - len(found)} RPC worker(s) to start")
            announced = now
        time.sleep(2.0)


RPC_WAIT_S = 900.0  # how long a leader waits for its workers: an agent must take each from its queue first


def rpc_worker_endpoints(task_ids: list[str]) -> list[str]:
    """The leader's wait for its workers (see worker_endpoints), progress in the log."""
    return worker_endpoints(task_ids, RPC_WAIT_S, progress=log.info)
