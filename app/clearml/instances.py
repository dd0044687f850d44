"""Launch, clone and read app instances: the SDK calls behind `python -m app.instances`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app import config as cfg
from app.clearml.session import write_parameters
from app.endpoint import APP_PROPERTIES


@dataclass
class Launched:
    id: str
    url: str
    queue: str


def create_instance(config: cfg.AppConfig, project: str, name: str, repo: str | None, branch: str | None,
                    commit: str | None, requirements: str, queue: str) -> Launched:
    """A new app task running `python -m app` from this repository, its form filled in, enqueued."""
    from clearml import Task

    task: Any = Task.create(project_name=project, task_name=name, task_type="application", repo=repo, branch=branch,
                       commit=commit, module="app", working_directory=".", requirements_file=requirements,
                       add_task_init_call=False, detect_repository=repo is None)
    write_parameters(task, config.model_dump())
    return _enqueue(task, queue)


def clone_instance(source_id: str, edits: dict[str, Any], name: str | None, queue: str) -> Launched:
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
