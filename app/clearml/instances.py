"""Launch, clone and read app instances: the SDK calls behind `python -m app.instances`.

Each launched task carries the container an agent in docker mode runs it in (a profile, overridable): the
agent's default image has no compiler and an old Python, and llama-cpp-python builds from source.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from app import config as cfg
from app.clearml.session import write_parameters
from app.endpoint import APP_PROPERTIES


@dataclass(frozen=True)
class ContainerProfile:
    """The docker image, arguments and setup script an agent in docker mode runs the app with."""

    image: str
    arguments: str
    setup_script: str

    def with_overrides(self, image: str | None, arguments: str | None) -> ContainerProfile:
        return replace(self, image=image or self.image, arguments=self.arguments if arguments is None else arguments)


# Host networking publishes whatever port the app binds (it picks a free one when the configured one is taken,
# so one agent can run several instances); the build tools let pip build llama-cpp-python from its sdist, with
# llama.cpp's RPC backend (RPC workers and leaders: app.rpc_worker, rpc_servers).
_BUILD_TOOLS = ("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                "build-essential cmake git > /dev/null")
PROFILES: dict[str, ContainerProfile] = {
    # Python 3.11 on Debian bookworm; CPU build.
    "cpu": ContainerProfile("python:3.11-bookworm", "--network host -e CMAKE_ARGS=-DGGML_RPC=on", _BUILD_TOOLS),
    # CUDA toolkit (nvcc) for the build, Ubuntu 22.04's Python 3.10, all GPUs; CMAKE_ARGS makes pip build
    # llama-cpp-python with CUDA (a CPU wheel from a shared pip cache would ignore "Number of GPU Layers": the app
    # then says so loudly at start, see app.engine.model.offload_report).
    "gpu": ContainerProfile(
        "nvidia/cuda:12.4.1-devel-ubuntu22.04",
        "--network host --gpus all -e 'CMAKE_ARGS=-DGGML_CUDA=on -DGGML_RPC=on' -e FORCE_CMAKE=1",
        "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential cmake git "
        "python3-pip python3-venv > /dev/null"),
}


@dataclass
class Launched:
    id: str
    url: str
    queue: str


def _new_task(project: str, name: str, module: str, repo: str | None, branch: str | None, commit: str | None,
              requirements: str, container: ContainerProfile) -> Any:
    """A task an agent runs as `python -m <module>` from this repository, in `container` (docker mode)."""
    from clearml import Task

    return Task.create(project_name=project, task_name=name, task_type="application", repo=repo, branch=branch,
                       commit=commit, module=module, working_directory=".", requirements_file=requirements,
                       add_task_init_call=False, detect_repository=repo is None, docker=container.image,
                       docker_args=container.arguments, docker_bash_setup_script=container.setup_script)


def create_instance(config: cfg.AppConfig, project: str, name: str, repo: str | None, branch: str | None,
                    commit: str | None, requirements: str, queue: str, container: ContainerProfile) -> Launched:
    """A new app task running `python -m app` from this repository, its form filled in, enqueued.

    The queue is looked up first: a wrong name creates nothing.
    """
    queue_id = _queue_id(queue)
    task = _new_task(project, name, "app", repo, branch, commit, requirements, container)
    write_parameters(task, config.model_dump())
    return _enqueue(task, queue, queue_id)


def clone_instance(source_id: str, edits: dict[str, Any], name: str | None, queue: str,
                   container: ContainerProfile | None = None, group: str | None = None) -> Launched:
    """A copy of an instance with its configuration (plus edits) and container (unless `container` replaces it),
    without its app-owned properties, enqueued."""
    from clearml import Task

    queue_id = _queue_id(queue)
    source: Any = Task.get_task(task_id=source_id)
    config = cfg.build({**cfg.from_strings(source.get_parameters() or {}), **edits})
    clone: Any = Task.clone(source_task=source, name=name or f"{source.name} (clone)")
    write_parameters(clone, config.model_dump())
    clone.delete_user_properties([("properties", name) for name in APP_PROPERTIES])
    tags = [t for t in (clone.get_tags() or []) if not str(t).startswith(GROUP_TAG)]
    if group is not None or len(tags) != len(clone.get_tags() or []):
        clone.set_tags(tags + ([group_tag(group)] if group is not None else []))  # a clone joins no group unasked
    if container is not None:
        clone.set_base_docker(docker_image=container.image, docker_arguments=container.arguments,
                              docker_setup_bash_script=container.setup_script)
    return _enqueue(clone, queue, queue_id)


def instance_config(task_id: str) -> cfg.AppConfig:
    """An instance's configuration, as its task's hyperparameters hold it (strings, cast and validated)."""
    from clearml import Task

    task: Any = Task.get_task(task_id=task_id)
    return cfg.build(cfg.from_strings(task.get_parameters() or {}))


def _queue_id(queue: str) -> str:
    """The queue's ID, or ValueError naming the queues there are (before anything is created)."""
    from clearml.backend_api.session.client import APIClient

    queues = APIClient().queues.get_all(only_fields=["id", "name"])
    for q in queues:
        if q.name == queue:
            return str(q.id)
    names = sorted(str(q.name) for q in queues)
    raise ValueError(f"no queue named {queue!r} (queues: {', '.join(names) or 'none'})")


def _enqueue(task: Any, queue: str, queue_id: str) -> Launched:
    from clearml import Task

    Task.enqueue(task, queue_id=queue_id)
    return Launched(task.id, task.get_output_log_web_page(), queue)


# --- replicas: one configuration, several tasks, one route -------------------------------------------------------

GROUP_TAG = "replica-group:"  # the tag every replica of a group carries
ALIVE = ("created", "queued", "in_progress")


@dataclass
class Replica:
    id: str
    status: str  # the task's: created, queued, in_progress
    app_status: str  # the app's own (loading, active, idle) once it runs, else ""
    api_base: str
    created: float  # seconds since the epoch


def group_tag(group: str) -> str:
    return GROUP_TAG + group


def gateway_supported() -> bool:
    """Does this server have the AI Application Gateway (an Enterprise, "advanced" feature set)?"""
    from clearml.backend_api.session import Session

    try:
        Session.verify_feature_set("advanced")
    except ValueError:
        return False
    return True


def check_static_route(route: str) -> None:
    """ValueError unless the gateway has `route` enabled and load-balanced: a replica asking for a route that is
    not there would fall back to its own address, and clients would not see one URL."""
    from clearml.backend_interface.routers import RouterService

    try:
        RouterService().validate_static_route(route)
    except ValueError as exc:
        raise ValueError(f"{exc}: create it on the AI Application Gateway (enabled, load-balanced) or name an "
                         "existing one with --set 'Advanced Options/static_route=NAME'") from None


def create_replicas(config: cfg.AppConfig, group: str, count: int, project: str, name: str, repo: str | None,
                    branch: str | None, commit: str | None, requirements: str, queue: str,
                    container: ContainerProfile) -> list[Launched]:
    """`count` identical app tasks tagged as one group, each enqueued; the queue is checked first."""
    queue_id = _queue_id(queue)
    launched = []
    for i in range(count):
        task = _new_task(project, f"{name} #{i + 1}", "app", repo, branch, commit, requirements, container)
        write_parameters(task, config.model_dump())
        task.set_tags([group_tag(group)])
        launched.append(_enqueue(task, queue, queue_id))
    return launched


def _user_property(task: Any, name: str) -> str:
    value = (task.get_user_properties() or {}).get(name)
    return str((value.get("value") if isinstance(value, dict) else value) or "")


def _created(task: Any) -> float:
    created = getattr(task.data, "created", None)
    return float(created.timestamp()) if created is not None else 0.0


def group_of(name_or_task: str) -> str:
    """A group's name, given either the name or the ID of one of its replicas."""
    from clearml import Task

    if replicas(name_or_task):
        return name_or_task
    try:
        task: Any = Task.get_task(task_id=name_or_task)
    except Exception:
        raise ValueError(f"no live replicas in a group named {name_or_task!r}, and no task with that ID") from None
    for tag in task.get_tags() or []:
        if str(tag).startswith(GROUP_TAG):
            return str(tag)[len(GROUP_TAG):]
    raise ValueError(f"task {name_or_task} is not a replica (it has no {GROUP_TAG} tag)")


def replicas(group: str) -> list[Replica]:
    """The group's live replicas (created, queued or running), oldest first."""
    from clearml import Task

    found: list[Any] = Task.get_tasks(tags=[group_tag(group)], task_filter={"status": list(ALIVE)}) or []
    out = [Replica(t.id, str(t.status), _user_property(t, "status"), _user_property(t, "API base"), _created(t))
           for t in found if str(t.status) in ALIVE]
    return sorted(out, key=lambda r: (r.created, r.id))


# Which replicas go first when scaling down: not yet running, then idle, then loading, then serving; newest first.
_STOP_ORDER = {"created": 0, "queued": 0}
_APP_ORDER = {"idle": 1, "loading": 2, "": 2, "active": 3}


def scale_down_order(members: list[Replica]) -> list[Replica]:
    return sorted(members, key=lambda r: (_STOP_ORDER.get(r.status, _APP_ORDER.get(r.app_status, 2)), -r.created))


def scale(group: str, count: int, queue: str, container: ContainerProfile | None = None
          ) -> tuple[list[Launched], list[Replica]]:
    """Bring the group to `count` live replicas: clones of the newest one are added, or the surplus is stopped
    through the normal stop path (tasks.stop: a queued replica leaves its queue; a running one gets the UI's
    abort, and drains, unregisters and reports `stopped` itself). Returns (added, stopped)."""
    from clearml import Task

    members = replicas(group)
    if not members:
        raise ValueError(f"no live replicas in group {group!r}")
    if count > len(members):
        source = members[-1]
        base = re.sub(r" #\d+$", "", str(Task.get_task(task_id=source.id).name))
        everyone: list[Any] = Task.get_tasks(tags=[group_tag(group)]) or []
        numbers = [int(m.group(1)) for t in everyone for m in [re.search(r" #(\d+)$", str(t.name))] if m]
        added = []
        for i in range(count - len(members)):
            name = f"{base} #{max(numbers, default=0) + i + 1}"
            added.append(clone_instance(source.id, {}, name, queue, container, group=group))
        return added, []
    victims = scale_down_order(members)[:len(members) - count]
    why = f"scaled down: group {group} to {count} replicas"
    for victim in victims:
        task: Any = Task.get_task(task_id=victim.id)
        if victim.status == "in_progress":
            task.mark_stop_request(force=False, status_message=why)  # the UI's abort: the app drains and stops
        else:  # not running yet: out of its queue, then stopped
            if victim.status == "queued":
                Task.dequeue(task)
            task.mark_stopped(force=True, status_message=why)
    return [], victims


# --- llama.cpp RPC workers: one leader app, K worker tasks ------------------------------------------------------

def create_with_rpc_workers(config: cfg.AppConfig, workers: int, project: str, name: str, repo: str | None,
                            branch: str | None, commit: str | None, requirements: str, queue: str, rpc_queue: str,
                            container: ContainerProfile, worker_port: int = 50052,
                            worker_threads: int = 0) -> tuple[Launched, list[Launched]]:
    """A leader app task and `workers` RPC worker tasks that know each other: each worker gets the leader's ID
    (it exits when the leader stops), the leader the workers' IDs (it waits for their endpoints, then loads the
    model across them). Both queues are checked before anything is created; workers are enqueued first."""
    from app.clearml.workers import WORKER_SECTION

    queue_id, rpc_queue_id = _queue_id(queue), _queue_id(rpc_queue)
    leader = _new_task(project, name, "app", repo, branch, commit, requirements, container)
    worker_tasks: list[Any] = []
    for i in range(workers):
        worker = _new_task(project, f"{name} RPC worker #{i + 1}", "app.rpc_worker", repo, branch, commit,
                           requirements, container)
        worker.set_parameters({f"{WORKER_SECTION}/leader": leader.id, f"{WORKER_SECTION}/host": "",
                               f"{WORKER_SECTION}/port": worker_port, f"{WORKER_SECTION}/threads": worker_threads,
                               f"{WORKER_SECTION}/idle_time_limit_hours": config.idle_time_limit_hours})
        worker_tasks.append(worker)
    config = config.model_copy(update={"rpc_worker_tasks": ",".join(w.id for w in worker_tasks)})
    write_parameters(leader, config.model_dump())
    launched_workers = [_enqueue(w, rpc_queue, rpc_queue_id) for w in worker_tasks]
    return _enqueue(leader, queue, queue_id), launched_workers
