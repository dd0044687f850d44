"""Launch, clone and read app instances: the SDK calls behind `python -m app.instances`.

Each launched task carries the container an agent in docker mode runs it in (a profile, overridable): the
agent's default image has no compiler and an old Python, and llama-cpp-python builds from source.
"""

from __future__ import annotations

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
# so one agent can run several instances); the build tools let pip build llama-cpp-python from its sdist.
_BUILD_TOOLS = ("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                "build-essential cmake git > /dev/null")
PROFILES: dict[str, ContainerProfile] = {
    # Python 3.11 on Debian bookworm; CPU build.
    "cpu": ContainerProfile("python:3.11-bookworm", "--network host", _BUILD_TOOLS),
    # CUDA toolkit (nvcc) for the build, Ubuntu 22.04's Python 3.10, all GPUs; CMAKE_ARGS makes pip build
    # llama-cpp-python with CUDA (a CPU wheel from a shared pip cache would ignore "Number of GPU Layers": the app
    # then says so loudly at start, see app.engine.model.offload_report).
    "gpu": ContainerProfile(
        "nvidia/cuda:12.4.1-devel-ubuntu22.04",
        "--network host --gpus all -e CMAKE_ARGS=-DGGML_CUDA=on -e FORCE_CMAKE=1",
        "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential cmake git "
        "python3-pip python3-venv > /dev/null"),
}


@dataclass
class Launched:
    id: str
    url: str
    queue: str


def create_instance(config: cfg.AppConfig, project: str, name: str, repo: str | None, branch: str | None,
                    commit: str | None, requirements: str, queue: str, container: ContainerProfile) -> Launched:
    """A new app task running `python -m app` from this repository, its form filled in, enqueued.

    The queue is looked up first: a wrong name creates nothing.
    """
    from clearml import Task

    queue_id = _queue_id(queue)
    task: Any = Task.create(project_name=project, task_name=name, task_type="application", repo=repo, branch=branch,
                            commit=commit, module="app", working_directory=".", requirements_file=requirements,
                            add_task_init_call=False, detect_repository=repo is None, docker=container.image,
                            docker_args=container.arguments, docker_bash_setup_script=container.setup_script)
    write_parameters(task, config.model_dump())
    return _enqueue(task, queue, queue_id)


def clone_instance(source_id: str, edits: dict[str, Any], name: str | None, queue: str,
                   container: ContainerProfile | None = None) -> Launched:
    """A copy of an instance with its configuration (plus edits) and container (unless `container` replaces it),
    without its app-owned properties, enqueued."""
    from clearml import Task

    queue_id = _queue_id(queue)
    source: Any = Task.get_task(task_id=source_id)
    config = cfg.build({**cfg.from_strings(source.get_parameters() or {}), **edits})
    clone: Any = Task.clone(source_task=source, name=name or f"{source.name} (clone)")
    write_parameters(clone, config.model_dump())
    clone.delete_user_properties([("properties", name) for name in APP_PROPERTIES])
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
