"""python -m app.instances: launch, clone, export and import app instances.

    launch     --queue Q [--config FILE.json] [--set Section/field=value ...] [field flags]
               [--replicas N [--group NAME]] [--rpc-workers K [--rpc-queue Q]]
    clone      TASK_ID [--queue Q] [--set Section/field=value ...] [--replicas N [--group NAME]]
    export     TASK_ID -o FILE.json [--include-secrets]
    import     FILE.json --queue Q [--set Section/field=value ...] [--replicas N [--group NAME]]
    scale      GROUP|TASK_ID --replicas N [--queue Q]
    endpoints  GROUP|TASK_ID [--listen PORT]

Replicas are N app tasks of one configuration that share the API key, the Model Endpoints name and, on a server
with the AI Application Gateway, one static route (one URL, balanced by the router). Without the gateway each
replica publishes its own address: `endpoints` lists them and prints an nginx upstream block for them.

The JSON is the same versioned document as `configs/*.json` and `--config`.
Everything is validated before anything is created: a bad field is reported by
name and no task appears.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from app import config as cfg
from app.clearml.instances import PROFILES, ContainerProfile
from app.model_source import ModelSourceError

log = logging.getLogger("app.instances")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_QUEUE = "default"
DEFAULT_PROJECT = "llama.cpp Model Deployment"
DEFAULT_NAME = "llama.cpp endpoint"


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """`Section/field=value` (or `field=value`) edits, as typed-ready field values."""
    raw: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise cfg.ConfigError(f"--set {item!r}: expected Section/field=value")
        if "/" not in key:
            if key not in cfg.AppConfig.model_fields:
                raise cfg.ConfigError(f"--set {key}: unknown field")
            key = f"{cfg.field_section(key)}/{key}"
        section, _, name = key.partition("/")
        if section not in cfg.SECTIONS:
            raise cfg.ConfigError(f"--set {key}: unknown section {section!r} (expected one of {list(cfg.SECTIONS)})")
        if name in cfg.AppConfig.model_fields and cfg.field_section(name) != section:
            raise cfg.ConfigError(f"--set {key}: {name} belongs to section {cfg.field_section(name)!r}")
        raw[key] = value
    return cfg.from_strings(raw)


def require_model(config: cfg.AppConfig) -> cfg.AppConfig:
    """A launch needs a model the app can fetch (checked here, before anything is created)."""
    try:
        config.model_spec()
    except ModelSourceError as exc:
        raise cfg.ConfigError(f"invalid configuration: model: {exc}") from None
    return config


def git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app.instances", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def container_options(p: argparse.ArgumentParser, default: str | None) -> None:
        p.add_argument("--profile", choices=sorted(PROFILES), default=default,
                       help="container for an agent in docker mode: cpu or gpu (a CUDA build of llama-cpp-python)"
                            + (f" (default: {default})" if default else " (default: keep the source's)"))
        p.add_argument("--docker-image", default=None, help="replace the profile's image")
        p.add_argument("--docker-args", default=None, help="replace the profile's docker arguments")

    def launch_options(p: argparse.ArgumentParser) -> None:
        container_options(p, "cpu")
        p.add_argument("--queue", default=DEFAULT_QUEUE, help="ClearML queue to enqueue to (default: default)")
        p.add_argument("--project-name", default=DEFAULT_PROJECT, help="ClearML project")
        p.add_argument("--task-name", default=DEFAULT_NAME, help="name of the new task")
        p.add_argument("--repo", default=None, help="git URL the agent clones (default: this checkout's origin)")
        p.add_argument("--branch", default=None, help="branch (default: this checkout's)")
        p.add_argument("--commit", default=None, help="commit (default: this checkout's HEAD)")
        p.add_argument("--set", action="append", default=[], metavar="Section/field=value",
                       help="edit one configuration field (repeatable)")

    def replica_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--replicas", type=int, default=1, help="identical instances behind one route (default 1)")
        p.add_argument("--group", default=None, help="the replicas' group name (default: the task name)")
        p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                       help="with replicas: wait this long for each to publish its API base, and print them")

    launch = sub.add_parser("launch", help="create an instance from a config file and/or flags, and enqueue it")
    launch_options(launch)
    replica_options(launch)
    launch.add_argument("--rpc-workers", type=int, default=0, metavar="K",
                        help="also launch K llama.cpp RPC worker tasks the model is split across")
    launch.add_argument("--rpc-queue", default=None, help="queue for the RPC workers (default: --queue)")
    launch.add_argument("--rpc-port", type=int, default=50052, help="the workers' RPC port (default 50052)")
    launch.add_argument("--config", metavar="FILE.json", help="configuration document")
    cfg.add_cli_arguments(launch)

    clone = sub.add_parser("clone", help="clone an instance with its configuration (plus --set edits), enqueue it")
    clone.add_argument("task_id")
    clone.add_argument("--queue", default=DEFAULT_QUEUE, help="ClearML queue to enqueue to (default: default)")
    clone.add_argument("--task-name", default=None, help="name of the clone (default: source name + ' (clone)')")
    clone.add_argument("--set", action="append", default=[], metavar="Section/field=value")
    container_options(clone, None)
    replica_options(clone)

    export = sub.add_parser("export", help="write an instance's configuration as JSON")
    export.add_argument("task_id")
    export.add_argument("-o", "--output", required=True, metavar="FILE.json")
    export.add_argument("--include-secrets", action="store_true", help="keep the HF token and API key (else ***)")

    imp = sub.add_parser("import", help="validate a JSON configuration, then launch an instance from it")
    imp.add_argument("file", metavar="FILE.json")
    launch_options(imp)
    replica_options(imp)

    scale = sub.add_parser("scale", help="add or stop replicas of a group (newest idle ones stop first)")
    scale.add_argument("group", metavar="GROUP|TASK_ID")
    scale.add_argument("--replicas", type=int, required=True)
    scale.add_argument("--queue", default=DEFAULT_QUEUE, help="queue for added replicas (default: default)")

    endpoints = sub.add_parser("endpoints", help="the group's published URLs, and an nginx upstream for them")
    endpoints.add_argument("group", metavar="GROUP|TASK_ID")
    endpoints.add_argument("--listen", type=int, default=8080, help="the port nginx listens on (default 8080)")
    return parser


def route_name(group: str) -> str:
    """A gateway route name from a group name: lowercase letters, digits and dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", group.lower()).strip("-")
    return slug or "llama-cpp"


def for_replicas(config: cfg.AppConfig, group: str) -> cfg.AppConfig:
    """One key and one route for the whole group (a key generated here when none is set)."""
    from app.api.auth import generate_key

    return config.model_copy(update={"api_key": config.api_key or generate_key(),
                                     "static_route": config.static_route or route_name(group)})


def nginx_upstream(group: str, api_bases: list[str], listen: int) -> str:
    """An nginx block balancing the replicas' published addresses (streams unbuffered, long reads)."""
    name = "llama_" + route_name(group).replace("-", "_")
    servers = []
    for base in api_bases:
        parsed = urlsplit(base)
        line = f"    server {parsed.hostname}:{parsed.port or (443 if parsed.scheme == 'https' else 80)};"
        if parsed.hostname and line not in servers:  # replicas behind one gateway route publish one URL
            servers.append(line)
    lines = [f"upstream {name} {{", "    least_conn;", *servers, "}", "",
             "server {", f"    listen {listen};", "    location / {", f"        proxy_pass http://{name};",
             "        proxy_http_version 1.1;", "        proxy_set_header Connection \"\";",
             "        proxy_buffering off;  # server-sent events: each token as it comes",
             "        proxy_read_timeout 3600s;", "    }", "}"]
    return "\n".join(lines) + "\n"


def wait_for_bases(group: str, count: int, wait_s: float) -> list[str]:
    from app.clearml import instances as clearml_io

    deadline = time.monotonic() + wait_s
    while True:
        bases = [r.api_base for r in clearml_io.replicas(group) if r.api_base]
        if len(bases) >= count or time.monotonic() >= deadline:
            return bases
        time.sleep(2.0)


def launch_config(args: argparse.Namespace, values: dict[str, Any]) -> cfg.AppConfig:
    values = {**values, **parse_sets(args.set)}
    return require_model(cfg.build(values))


def container_of(args: argparse.Namespace) -> ContainerProfile | None:
    """The profile asked for, with the image or arguments replaced; None (clone) keeps the source's."""
    profile, image, arguments = (getattr(args, n, None) for n in ("profile", "docker_image", "docker_args"))
    if profile is None and image is None and arguments is None:
        return None
    return PROFILES[profile or "cpu"].with_overrides(image, arguments)


def report(launched: Any, what: str) -> None:
    sys.stdout.write(f"{what}: task {launched.id}, enqueued to '{launched.queue}'\n")
    sys.stdout.write(f"  web: {launched.url}\n")
    sys.stdout.write("  follow: on that page, CONSOLE shows setup progress and status changes; USER PROPERTIES show "
                     "status, API base, API key and a ready-to-paste test command once the model is loaded\n")


def report_replicas(launched: list[Any], group: str, config: cfg.AppConfig, gateway: bool, wait_s: float) -> None:
    out = sys.stdout
    out.write(f"replica group '{group}': {len(launched)} instance(s), one API key")
    out.write(f", gateway route '{config.static_route}'\n" if gateway else "\n")
    for item in launched:
        out.write(f"  task {item.id}, enqueued to '{item.queue}': {item.url}\n")
    if gateway:
        out.write("  clients use the route's one URL (each replica's API base property shows it once it runs)\n")
        return
    out.write("  this ClearML server has no AI Application Gateway: each replica publishes its own address, "
              "and nothing balances them. Put a load balancer in front: once they run, "
              f"`python -m app.instances endpoints {group}` prints their URLs and an nginx upstream for them\n")
    if wait_s > 0:
        from app.clearml import instances as clearml_io

        bases = wait_for_bases(group, len(launched), wait_s)
        for replica in clearml_io.replicas(group):
            out.write(f"  {replica.id}: {replica.api_base or '(not published yet)'}\n")
        if len(bases) < len(launched):
            out.write(f"  {len(launched) - len(bases)} replica(s) published no URL within {wait_s:.0f} s\n")


def replica_gateway(config: cfg.AppConfig) -> bool:
    """Does the server have the gateway? If so its static route must exist before any replica is created."""
    from app.clearml import instances as clearml_io

    if not clearml_io.gateway_supported():
        return False
    clearml_io.check_static_route(config.static_route)
    return True


def check_counts(args: argparse.Namespace) -> None:
    if getattr(args, "replicas", 1) < 1:
        raise cfg.ConfigError("--replicas: at least 1")
    workers = getattr(args, "rpc_workers", 0)
    if workers < 0:
        raise cfg.ConfigError("--rpc-workers: 0 or more")
    if workers and args.replicas > 1:
        raise cfg.ConfigError("--rpc-workers with --replicas: each leader needs workers of its own; launch the "
                              "groups one by one")


def run(args: argparse.Namespace) -> int:
    from app.clearml import instances as clearml_io

    container = container_of(args) if args.command in ("launch", "import", "clone") else None
    check_counts(args)

    if args.command in ("launch", "import"):
        if args.command == "launch":
            values = cfg.load_json(args.config) if args.config else {}
            values.update(cfg.cli_values(args))
        else:
            values = cfg.load_json(args.file)
        config = launch_config(args, values)
        repo = args.repo or git("remote", "get-url", "origin")
        if repo is None:
            log.warning("no git remote for this checkout and no --repo: an agent will not find the code to run")
        source = (repo, args.branch or git("rev-parse", "--abbrev-ref", "HEAD"),
                  args.commit or git("rev-parse", "HEAD"), str(REPO_ROOT / "requirements.txt"))
        profile = container or PROFILES["cpu"]
        if getattr(args, "rpc_workers", 0):
            leader, workers = clearml_io.create_with_rpc_workers(
                config, args.rpc_workers, args.project_name, args.task_name, *source, args.queue,
                args.rpc_queue or args.queue, profile, worker_port=args.rpc_port)
            report(leader, "launched")
            for worker in workers:
                sys.stdout.write(f"  RPC worker: task {worker.id}, enqueued to '{worker.queue}': {worker.url}\n")
            sys.stdout.write("  the workers bind private addresses only (the RPC protocol has no authentication); "
                             "the leader waits for their endpoints, then loads the model across them\n")
            return 0
        if args.replicas > 1 or args.group:
            group = args.group or args.task_name
            config = for_replicas(config, group)
            gateway = replica_gateway(config)
            launched = clearml_io.create_replicas(config, group, args.replicas, args.project_name, args.task_name,
                                                  *source, args.queue, profile)
            report_replicas(launched, group, config, gateway, args.wait)
            return 0
        launched_one = clearml_io.create_instance(config, args.project_name, args.task_name, *source, args.queue,
                                                  profile)
        report(launched_one, "launched" if args.command == "launch" else "imported")
        return 0
    if args.command == "clone":
        edits = parse_sets(args.set)
        if args.replicas > 1 or args.group:
            group = args.group or args.task_name or f"clone of {args.task_id}"
            source_config = clearml_io.instance_config(args.task_id)
            shared = for_replicas(cfg.build({**source_config.model_dump(), **edits}), group)
            edits = {**edits, "api_key": shared.api_key, "static_route": shared.static_route}
            gateway = replica_gateway(shared)
            launched = [clearml_io.clone_instance(args.task_id, edits, f"{args.task_name or group} #{i + 1}",
                                                  args.queue, container, group=group)
                        for i in range(args.replicas)]
            report_replicas(launched, group, shared, gateway, args.wait)
            return 0
        launched_one = clearml_io.clone_instance(args.task_id, edits, args.task_name, args.queue, container)
        report(launched_one, "cloned")
        return 0
    if args.command == "export":
        doc = cfg.to_document(clearml_io.instance_config(args.task_id), include_secrets=args.include_secrets)
        Path(args.output).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        masked = "" if args.include_secrets else " (secrets masked)"
        sys.stdout.write(f"exported task {args.task_id} to {args.output}{masked}\n")
        return 0
    if args.command == "scale":
        group = clearml_io.group_of(args.group)
        added, stopped = clearml_io.scale(group, args.replicas, args.queue)
        for item in added:
            sys.stdout.write(f"added: task {item.id}, enqueued to '{item.queue}': {item.url}\n")
        for replica in stopped:
            state = replica.app_status or replica.status
            sys.stdout.write(f"stopping: task {replica.id} ({state}): it drains, unregisters and reports stopped\n")
        if not added and not stopped:
            sys.stdout.write(f"group '{group}' already has {args.replicas} live replica(s)\n")
        return 0
    if args.command == "endpoints":
        group = clearml_io.group_of(args.group)
        members = clearml_io.replicas(group)
        if not members:
            raise ValueError(f"no live replicas in group {group!r}")
        for replica in members:
            sys.stdout.write(f"# {replica.id} ({replica.app_status or replica.status}): "
                             f"{replica.api_base or 'no URL published yet'}\n")
        bases = [r.api_base for r in members if r.api_base]
        if bases:
            sys.stdout.write(nginx_upstream(group, bases, args.listen))
        return 0
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except cfg.ConfigError as exc:
        log.error("%s", exc)
        return 2
    except Exception as exc:  # the SDK's errors: one line with the cause, not a traceback
        log.debug("failed", exc_info=True)
        log.error("%s failed: %s: %s", args.command, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return 1


if __name__ == "__main__":
    sys.exit(main())
