"""python -m app: configuration, model, server, shutdown, exit code."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from typing import Optional, Sequence

from app import config as cfg
from app.api.app import create_app
from app.api.auth import generate_key
from app.model_source import ModelSourceError, default_alias, demo_model_path, inspect_gguf, kind_of, resolve_local
from app.runtime import Runtime
from app.server import bind_socket, serve

log = logging.getLogger("app")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description="Serve a GGUF model as an authenticated OpenAI-compatible endpoint (ClearML app).",
    )
    parser.add_argument("--config", metavar="FILE.json", help="JSON configuration (flat or the exported format)")
    parser.add_argument("--offline", action="store_true", help="run the ClearML SDK in offline mode")
    parser.add_argument("--log-level", default=os.environ.get("APP_LOG_LEVEL", "INFO"),
                        help="logging level (default INFO)")
    parser.add_argument("--drain-timeout-sec", type=float, default=30.0,
                        help="how long in-flight requests may finish at shutdown (default 30)")
    cfg.add_cli_arguments(parser)
    return parser


def resolve_config(args: argparse.Namespace) -> cfg.AppConfig:
    """defaults < --config FILE.json < CLI flags."""
    values: dict[str, object] = {}
    if args.config:
        values.update(cfg.load_json(args.config))
    values.update(cfg.cli_values(args))
    return cfg.build(values)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def fetch_model(config: cfg.AppConfig) -> str:
    """The local path of the configured model (downloading it if needed)."""
    spec = config.model.strip()
    if not spec:
        raise ModelSourceError("no model given: set General/model (or --model)")
    kind = kind_of(spec)
    if kind == "demo":
        return demo_model_path()
    if kind == "local":
        return resolve_local(spec)
    raise ModelSourceError(f"model source for {spec!r} is not available in this build")


def load_in_background(config: cfg.AppConfig, runtime: Runtime) -> threading.Thread:
    def work() -> None:
        from app.engine.engine import EngineOptions, load_engine

        try:
            path = fetch_model(config)
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
        runtime.state = "ready"
        log.info("ready: serving %s", runtime.model_id)

    thread = threading.Thread(target=work, name="model-loader", daemon=True)
    thread.start()
    return thread


def fail(runtime: Runtime, cause: str) -> None:
    log.error("%s", cause)
    runtime.failure = cause
    runtime.state = "failed"
    runtime.request_stop("failed")


def announce(host: str, port: int, api_key: str, model_id: str) -> None:
    shown = "localhost" if host in ("0.0.0.0", "::", "127.0.0.1") else host
    base = f"http://{shown}:{port}/v1"
    log.info("API base: %s", base)
    log.info("API key: %s", api_key)
    log.info("test: curl -s %s/chat/completions -H 'Authorization: Bearer %s' -H 'Content-Type: application/json' "
             "-d '{\"model\": \"%s\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], "
             "\"max_tokens\": 32}'", base, api_key, model_id)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        config = resolve_config(args)
    except cfg.ConfigError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    log.info("configuration: %s", config.masked())
    api_key = config.api_key or generate_key()
    runtime = Runtime(api_key=api_key, model_id=config.model_alias or default_alias(config.model))
    try:
        sock = bind_socket(config.host, config.port)
    except OSError as exc:
        log.error("%s", exc)
        return EXIT_FAILED
    port = sock.getsockname()[1]
    log.info("listening on %s:%d", config.host, port)
    announce(config.host, port, api_key, runtime.model_id)
    loader = load_in_background(config, runtime)
    app = create_app(runtime)
    try:
        serve(app, runtime, sock, args.drain_timeout_sec)
    finally:
        runtime.state = "stopping"
        loader.join(timeout=60)
        if runtime.engine is not None:
            runtime.engine.close()
    reason = runtime.shutdown_reason or "server stopped"
    if runtime.failure:
        log.error("stopped: %s", runtime.failure)
        return EXIT_FAILED
    log.info("stopped (%s)", reason)
    return EXIT_OK
