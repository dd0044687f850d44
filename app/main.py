"""python -m app: configuration, then the run: task, socket, loader, telemetry, server, and the exit code.

Each job lives in its own object (Lifecycle, ModelLoader, Reporter, IdleWatchdog, the server); `run` only
wires them together, in order, and takes them apart again.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence

from app import config as cfg
from app.clearml.session import DEFAULT_PROJECT, DEFAULT_TASK_NAME, AppTask, offline_requested
from app.endpoint import GPU_OFFLOAD, IDLE_TIME, LAST_ACTION, STATUS, EndpointInfo
from app.lifecycle import Lifecycle, State
from app.loader import EarlyLoad, ModelLoader
from app.telemetry.history import ConsoleTail

log = logging.getLogger("app")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
# Past the drain timeout, what a shutdown may still take: ending streams that outlast the drain (3 s), the
# reporter's join (10 s), the loader's (60 s) and ClearML's last words (20 s). An abort from the UI waits this long.
SHUTDOWN_MARGIN_S = 100.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m app",
        allow_abbrev=False,  # an abbreviated secret flag (--api-k) would slip past scrub_secrets
        description="Serve a GGUF model as an authenticated OpenAI-compatible endpoint (ClearML app).",
    )
    parser.add_argument("--config", metavar="FILE.json", help="JSON configuration (flat or the exported format)")
    parser.add_argument("--offline", action="store_true", help="run the ClearML SDK in offline mode")
    parser.add_argument("--log-level", default=os.environ.get("APP_LOG_LEVEL", "INFO"),
                        help="logging level (default INFO)")
    parser.add_argument("--drain-timeout-sec", type=float, default=30.0,
                        help="how long in-flight requests may finish at shutdown (default 30)")
    parser.add_argument("--project-name", default=DEFAULT_PROJECT, help="ClearML project for a local run")
    parser.add_argument("--task-name", default=DEFAULT_TASK_NAME, help="ClearML task name for a local run")
    parser.add_argument("--hf-token-file", metavar="PATH",
                        help="read the Hugging Face token from this file (kept off the process list, unlike "
                             "--hf-token); HF_TOKEN in the environment is used when no token is given")
    cfg.add_cli_arguments(parser)
    return parser


def scrub_secrets(argv: Sequence[str]) -> list[str]:
    """argv with the values of secret flags replaced by ***."""
    flags = {"--" + name.replace("_", "-") for name in cfg.secret_fields()}
    out: list[str] = []
    hide_next = False
    for item in argv:
        if hide_next:
            out.append("***")
            hide_next = False
        elif item in flags:
            out.append(item)
            hide_next = True
        elif item.split("=", 1)[0] in flags and "=" in item:
            out.append(item.split("=", 1)[0] + "=***")
        else:
            out.append(item)
    return out


def resolve_config(args: argparse.Namespace) -> cfg.AppConfig:
    """defaults < --config FILE.json < --hf-token-file < CLI flags.

    HF_TOKEN from the environment comes last of all, when the model is fetched
    (`model_source.hub_token`): it never enters the configuration, so never the task.
    """
    values: dict[str, object] = {}
    if args.config:
        values.update(cfg.load_json(args.config))
    if args.hf_token_file:
        values["hf_token"] = cfg.read_secret_file(args.hf_token_file, "--hf-token-file")
    values.update(cfg.cli_values(args))
    return cfg.build(values)


def warn_visible_secrets(args: argparse.Namespace) -> None:
    """scrub_secrets hides flags from ClearML, not from `ps`: say so, once, without the value."""
    if getattr(args, "hf_token", ""):
        log.warning("--hf-token is visible to other local users on the process list; "
                    "prefer HF_TOKEN in the environment or --hf-token-file")


def setup_logging(level: str) -> ConsoleTail:
    """stderr, plus the tail the dashboard shows."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    tail = ConsoleTail()
    logging.getLogger().addHandler(tail)
    return tail


def announce(info: EndpointInfo) -> None:
    log.info("API base: %s", info.api_base)
    log.info("API key: %s", info.api_key)
    log.info("test: %s", info.test_command)


def configure(args: argparse.Namespace, task: AppTask | None, local: cfg.AppConfig | None) -> cfg.AppConfig:
    """Local layers (`local`, when they were already resolved), or the task's values when an agent runs it (UI
    edits win)."""
    if task is not None and task.running_remotely:
        config = cfg.build(task.remote_values())
        if config.host == "127.0.0.1":
            # Under an agent the endpoint must be reachable from other machines.
            config.host = "0.0.0.0"
        return config
    return local if local is not None else resolve_config(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = setup_logging(args.log_level)
    warn_visible_secrets(args)
    # ClearML records the command line on the task: secrets given as flags must not ride along.
    sys.argv[:] = scrub_secrets(sys.argv)
    local = local_config(args)
    # Locally the command line is the configuration: the model starts loading now, while ClearML starts.
    early = EarlyLoad.start(local) if local is not None else None
    task: AppTask | None = None
    try:
        task = AppTask.start(offline_requested(args.offline), args.project_name, args.task_name,
                             backlog=console.tail)
    except Exception as exc:  # no ClearML must not mean no endpoint
        log.warning("ClearML task could not start (%s); serving without a task", exc)
    try:
        config = configure(args, task, local)
        # Before a port is bound or a byte downloaded: a model to serve, threads this machine can run.
        cfg.check_runnable(config)
    except cfg.ConfigError as exc:
        report_failure(task, str(exc))
        return leave(task, EXIT_CONFIG)
    try:
        code = run(config, task, args.drain_timeout_sec, console, early)
    finally:
        logging.getLogger().removeHandler(console)
    return leave(task, code)


def local_config(args: argparse.Namespace) -> cfg.AppConfig | None:
    """The command line's configuration, resolved before ClearML starts; None under an agent (the task's values
    decide) or when it will be refused (configure resolves it again and the cause is reported on the task)."""
    if os.environ.get("CLEARML_TASK_ID"):
        return None
    try:
        config = resolve_config(args)
        cfg.check_runnable(config)
    except cfg.ConfigError:
        return None
    return config


def leave(task: AppTask | None, code: int) -> int:
    """The exit code. When ClearML stopped answering at shutdown, the process exits here and now: the SDK's exit
    hook would retry the unreachable server for hours (a 503 forever), keeping an idle machine up."""
    if task is not None and task.abandoned:
        # Not logging.shutdown(): it would join the SDK's log thread, which waits on the server too.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def run(config: cfg.AppConfig, task: AppTask | None, drain_timeout_s: float, console: ConsoleTail,
        early: EarlyLoad | None = None) -> int:
    # The serving side (FastAPI, uvicorn, telemetry) is imported here, after the model load has started.
    from app.api.auth import generate_key
    from app.api.context import ServingContext
    from app.clearml.endpoint import EndpointRegistration, model_references, published_endpoint
    from app.clearml.storage import ClearMLStorage
    from app.clearml.workers import rpc_worker_endpoints
    from app.server import bind_socket, serve
    from app.telemetry.reporter import IdleWatchdog, Reporter

    log.info("configuration: %s", config.masked())
    spec = config.model_spec()  # checked by check_runnable: parses
    model_id = config.served_name
    lifecycle = Lifecycle()
    finished = threading.Event()  # set when `finish` is done: an abort from the UI waits for it
    context = ServingContext(lifecycle, config.api_key or generate_key(), model_id, console=console,
                             cors_origins=config.allowed_origins())
    if task is not None:
        task.connect_config(config)
        # A clone inherits its source's properties: start from a clean slate.
        task.set_properties(**{STATUS: State.LOADING.value, **EndpointInfo(model=model_id).properties(),
                               IDLE_TIME: "0", LAST_ACTION: ""})
        lifecycle.subscribe(lambda state: task.set_properties(**{STATUS: state.shown}))
        task.register_abort(lambda: lifecycle.request_stop("aborted from the ClearML UI"), finished,
                            drain_timeout_s + SHUTDOWN_MARGIN_S)
    log.info("status: %s", State.LOADING.value)
    try:
        sock = bind_socket(config.host, config.port, any_free_port=task is not None and task.running_remotely)
    except OSError as exc:
        lifecycle.fail(str(exc))
        if early is not None:
            early.discard()
        return finish(task, lifecycle, finished)
    port = sock.getsockname()[1]
    log.info("listening on %s:%d", config.host, port)
    # Load while the endpoint is published: a gateway route may take up to its wait timeout to appear.
    loader = ModelLoader(config, spec, model_id, lifecycle, ClearMLStorage() if task is not None else None,
                         on_loaded=context.stats.restart_idle_clock,
                         gpus=lambda: len(context.hardware.latest().gpus),
                         on_gpu_offload=lambda text: task.set_properties(**{GPU_OFFLOAD: text}) if task else None,
                         early=early, rpc_workers=rpc_worker_endpoints if task is not None and not task.offline
                         else None)
    loader.start()
    context.endpoint = published_endpoint(task, config.host, port, context.api_key, model_id, config.static_route)
    announce(context.endpoint)
    registration: EndpointRegistration | None = None
    if task is not None:
        task.set_properties(**context.endpoint.properties())
        registration = EndpointRegistration(task, model_id, context.endpoint.api_base, model_id, config.model,
                                            config.last_action_report_interval_sec,
                                            model_references(spec.kind, spec.value))
        registration.register()  # while loading: the row shows the instance before it serves
    watchdog = IdleWatchdog(context.stats, lifecycle, config.idle_time_limit_hours * 3600.0, lifecycle.request_stop)
    reporter = Reporter(context.stats, context.hardware, context.history, lifecycle, lifecycle.note_activity, task,
                        config.last_action_report_interval_sec, endpoint=registration)
    reporter.start()
    watchdog.start()
    from app.api.app import create_app  # FastAPI and the routes: imported while the model loads

    try:
        serve(create_app(context), lifecycle, context.stats, sock, drain_timeout_s)
    finally:
        watchdog.stop()
        reporter.stop()
        loader.join(timeout=60)
        if lifecycle.engine is not None:
            lifecycle.engine.close()
    return finish(task, lifecycle, finished, registration.unregister if registration is not None else None)


def finish(task: AppTask | None, lifecycle: Lifecycle, finished: threading.Event,
           unregister: Callable[[], None] | None = None) -> int:
    """Report the end of the story and pick the exit code; `finished` is set once the task is closed (or, with
    ClearML unreachable, given up on). Unregistering is one of the task's last words, inside its time budget."""
    try:
        if lifecycle.finish() is State.FAILED:
            report_failure(task, lifecycle.failure or "failed", unregister)
            return EXIT_FAILED
        if task is not None:
            task.close(before=unregister)
        return EXIT_OK
    finally:
        finished.set()


def report_failure(task: AppTask | None, cause: str, unregister: Callable[[], None] | None = None) -> None:
    """One error line with the cause, and the task marked failed."""
    log.error("failed: %s", cause)
    if task is not None:
        task.set_properties(**{STATUS: State.FAILED.value})
        task.close(before=unregister, failure=cause)
