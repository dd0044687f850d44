"""python -m app.instances: launch, clone, export and import app instances.

    launch  --queue Q [--config FILE.json] [--set Section/field=value ...] [field flags]
    clone   TASK_ID [--queue Q] [--set Section/field=value ...]
    export  TASK_ID -o FILE.json [--include-secrets]
    import  FILE.json --queue Q [--set Section/field=value ...]

The JSON is the same versioned document as `configs/*.json` and `--config`.
Everything is validated before anything is created: a bad field is reported by
name and no task appears.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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

    launch = sub.add_parser("launch", help="create an instance from a config file and/or flags, and enqueue it")
    launch_options(launch)
    launch.add_argument("--config", metavar="FILE.json", help="configuration document")
    cfg.add_cli_arguments(launch)

    clone = sub.add_parser("clone", help="clone an instance with its configuration (plus --set edits), enqueue it")
    clone.add_argument("task_id")
    clone.add_argument("--queue", default=DEFAULT_QUEUE, help="ClearML queue to enqueue to (default: default)")
    clone.add_argument("--task-name", default=None, help="name of the clone (default: source name + ' (clone)')")
    clone.add_argument("--set", action="append", default=[], metavar="Section/field=value")
    container_options(clone, None)

    export = sub.add_parser("export", help="write an instance's configuration as JSON")
    export.add_argument("task_id")
    export.add_argument("-o", "--output", required=True, metavar="FILE.json")
    export.add_argument("--include-secrets", action="store_true", help="keep the HF token and API key (else ***)")

    imp = sub.add_parser("import", help="validate a JSON configuration, then launch an instance from it")
    imp.add_argument("file", metavar="FILE.json")
    launch_options(imp)
    return parser


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


def run(args: argparse.Namespace) -> int:
    from app.clearml import instances as clearml_io

    container = container_of(args)

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
        launched = clearml_io.create_instance(
            config, args.project_name, args.task_name, repo,
            args.branch or git("rev-parse", "--abbrev-ref", "HEAD"), args.commit or git("rev-parse", "HEAD"),
            str(REPO_ROOT / "requirements.txt"), args.queue, container or PROFILES["cpu"])
        report(launched, "launched" if args.command == "launch" else "imported")
        return 0
    if args.command == "clone":
        launched = clearml_io.clone_instance(args.task_id, parse_sets(args.set), args.task_name, args.queue,
                                             container)
        report(launched, "cloned")
        return 0
    if args.command == "export":
        doc = cfg.to_document(clearml_io.instance_config(args.task_id), include_secrets=args.include_secrets)
        Path(args.output).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        masked = "" if args.include_secrets else " (secrets masked)"
        sys.stdout.write(f"exported task {args.task_id} to {args.output}{masked}\n")
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
