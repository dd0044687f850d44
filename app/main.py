"""python -m app: configuration, model, server, shutdown, exit code."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
from typing import Callable, Optional, Sequence

from app import config as cfg
from app.api.app import create_app
from app.api.auth import generate_key
from app.model_source import ModelSourceError, default_alias, fetch, inspect_gguf
from app.task import DEFAULT_PROJECT, DEFAULT_TASK_NAME, AppTask, EndpointRegistration, offline_requested
from app.telemetry.history import ConsoleTail
from app.telemetry.reporter import Reporter
from app.runtime import Runtime
from app.server import bind_socket, serve

log = logging.getLogger("app")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


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


def load_in_background(config: cfg.AppConfig, runtime: Runtime, on_ready: Callable[[], None]) -> threading.Thread:
    def work() -> None:
        from app.engine.engine import EngineOptions, load_engine

        try:
            path = fetch(config.model, config.hf_token)
            info = inspect_gguf(path)
            log.info("model file: %s", info.summary())
            engine = load_engine(EngineOptions(
                path=path, model_id=runtime.model_id, n_ctx=config.n_ctx, n_batch=config.n_batch,
                n_threads=config.n_threads, n_gpu_layers=config.n_gpu_layers, parallel=config.parallel,
                max_queue=config.max_queue, embeddings=config.embeddings, chat_format=config.chat_format,
                verbose=log.isEnabledFor(logging.DEBUG),
            ))
        except ModelSourceError as exc:
            fail(runtime, str(exc))
            return
        except Exception as exc:  # a load failure must end the run with its cause, not hang it
            log.debug("model load failed", exc_info=True)
            fail(runtime, f"model load failed: {exc}")
            return
        runtime.engine = engine
        if runtime.stop_requested.is_set():
            return
        runtime.stats.restart_idle_clock()
        runtime.state = "ready"
        log.info("ready: serving %s", runtime.model_id)
        on_ready()

    thread = threading.Thread(target=work, name="model-loader", daemon=True)
    thread.start()
    return thread


def fail(runtime: Runtime, cause: str) -> None:
    """Record the cause and stop; `finish` logs it once and fails the task."""
    runtime.failure = cause
    runtime.state = "failed"
    runtime.request_stop("failed")


def endpoint_properties(host: str, port: int, api_key: str, model_id: str) -> dict[str, str]:
    """What the user needs to call the endpoint: shown on the task and in the log."""
    shown = host
    if host in ("0.0.0.0", "::"):
        shown = socket.gethostbyname(socket.gethostname())
    elif host == "127.0.0.1":
        shown = "localhost"
    url = f"http://{shown}:{port}"
    base = f"{url}/v1"
    test = (f"curl -s {base}/chat/completions -H 'Authorization: Bearer {api_key}' "
            f"-H 'Content-Type: application/json' -d '{{\"model\": \"{model_id}\", \"messages\": "
            f"[{{\"role\": \"user\", \"content\": \"Write one sentence about the sea.\"}}], "
            f"\"max_tokens\": 32, \"temperature\": 0}}'")
    return {"App URL": url, "API base": base, "API key": api_key, "test command": test, "model": model_id}


def announce(props: dict[str, str]) -> None:
    log.info("API base: %s", props["API base"])
    log.info("API key: %s", props["API key"])
    log.info("test: %s", props["test command"])


def configure(args: argparse.Namespace, task: Optional[AppTask]) -> cfg.AppConfig:
    """Local layers, or the task's values when an agent runs it (UI edits win)."""
    if task is not None and task.running_remotely:
        config = cfg.build(task.remote_values())
        if config.host == "127.0.0.1":
            # Under an agent the endpoint must be reachable from other machines.
            config.host = "0.0.0.0"
        return config
    return resolve_config(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    console = setup_logging(args.log_level)
    warn_visible_secrets(args)
    # ClearML records the command line on the task: secrets given as flags must not ride along.
    sys.argv[:] = scrub_secrets(sys.argv)
    task: Optional[AppTask] = None
    try:
        task = AppTask.start(offline_requested(args.offline), args.project_name, args.task_name)
    except Exception as exc:  # no ClearML must not mean no endpoint
        log.warning("ClearML task could not start (%s); serving without a task", exc)
    try:
        config = configure(args, task)
        # Before a port is bound or a byte downloaded: a model to serve, threads this machine can run.
        cfg.check_runnable(config)
    except cfg.ConfigError as exc:
        report_failure(task, str(exc))
        return EXIT_CONFIG
    try:
        return run(config, task, args.drain_timeout_sec, console)
    finally:
        logging.getLogger().removeHandler(console)


def run(config: cfg.AppConfig, task: Optional[AppTask], drain_timeout_s: float, console: ConsoleTail) -> int:
    log.info("configuration: %s", config.masked())
    api_key = config.api_key or generate_key()
    runtime = Runtime(api_key=api_key, model_id=config.model_alias or default_alias(config.model), console=console)
    if task is not None:
        task.connect_config(config)
        # A clone inherits its source's properties: start from a clean slate.
        task.set_properties(**{"status": "loading", "App URL": "", "API base": "", "API key": "",
                               "test command": "", "idle time (s)": "0", "last action": "",
                               "model": runtime.model_id})
        task.register_abort(lambda: runtime.request_stop("aborted from the ClearML UI"))
    log.info("status: loading")
    try:
        sock = bind_socket(config.host, config.port)
    except OSError as exc:
        return finish(task, runtime, f"{exc}")
    port = sock.getsockname()[1]
    log.info("listening on %s:%d", config.host, port)
    props = endpoint_properties(config.host, port, api_key, runtime.model_id)
    runtime.properties.update(props)
    announce(props)
    registration: Optional[EndpointRegistration] = None
    if task is not None:
        task.set_properties(**props)
        registration = EndpointRegistration(task, runtime.model_id, props["API base"], runtime.model_id,
                                            config.model, config.last_action_report_interval_sec)
    reporter = Reporter(runtime, task, config.last_action_report_interval_sec,
                        config.idle_time_limit_hours * 3600.0, endpoint=registration)

    def on_ready() -> None:
        reporter.set_status("idle")
        if registration is not None:
            registration.register()

    loader = load_in_background(config, runtime, on_ready=on_ready)
    reporter.start()
    app = create_app(runtime)
    try:
        serve(app, runtime, sock, drain_timeout_s)
    finally:
        runtime.state = "stopping"
        reporter.stop()
        if registration is not None:
            registration.unregister()
        loader.join(timeout=60)
        if runtime.engine is not None:
            runtime.engine.close()
    return finish(task, runtime, runtime.failure)


def finish(task: Optional[AppTask], runtime: Runtime, failure: Optional[str]) -> int:
    """Report the end of the story and pick the exit code."""
    if failure:
        report_failure(task, failure)
        return EXIT_FAILED
    log.info("status: stopped (%s)", runtime.shutdown_reason or "server stopped")
    if task is not None:
        task.set_properties(status="stopped")
        task.close()
    return EXIT_OK


def report_failure(task: Optional[AppTask], cause: str) -> None:
    """One error line with the cause, and the task marked failed."""
    log.error("failed: %s", cause)
    if task is not None:
        task.set_properties(status="failed")
        task.mark_failed(cause)
        task.close()
