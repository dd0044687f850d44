"""create_app: the FastAPI application, its middleware and its routers."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from fastapi import FastAPI, HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.auth import APIKeyAuth
from app.api.dashboard import dashboard_router
from app.api.errors import error_body, install_error_handlers
from app.api.routes import api_router, extras_router, health_router
from app.runtime import Runtime
from app.telemetry.prometheus import LiveCollector

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024 * 1024
# Probes, scrapes and the dashboard are not use: they are neither counted nor keep an idle app alive.
UNCOUNTED_PATHS = frozenset({"/health", "/metrics", "/", "/dashboard", "/dashboard/status", "/dashboard/data"})


class StatsMiddleware:
    """Counts every API request from its start to its last byte (streams included) and caps body size."""

    def __init__(self, app: ASGIApp, runtime: Runtime, max_body: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.runtime = runtime
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNCOUNTED_PATHS:
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await _send_json(send, 413, error_body(
                f"The request body is larger than the limit of {self.max_body} bytes.", "invalid_request_error",
                None, "request_too_large"))
            return
        stats = self.runtime.stats
        record: dict[str, Any] = scope.setdefault("app.metrics", {})
        status = {"code": 500}
        received = {"bytes": 0}
        started = stats.begin()

        async def limited_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                received["bytes"] += len(message.get("body", b""))
                if received["bytes"] > self.max_body:
                    # FastAPI re-raises HTTPException from body parsing, so this reaches our error handler.
                    raise HTTPException(413, f"The request body is larger than the limit of {self.max_body} bytes.")
            return message

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, limited_receive, send_wrapper)
        finally:
            stats.end(scope["path"], status["code"], started, record.get("ttft_s"),
                      record.get("prompt_tokens", 0), record.get("completion_tokens", 0))


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def create_app(runtime: Runtime) -> FastAPI:
    """The whole HTTP surface, bound to one Runtime."""
    # FastAPI's own /openapi.json, /docs and /redoc would answer without the key (and the docs pages load
    # from a CDN): the schema is served behind the key by extras_router instead.
    app = FastAPI(title="llama.cpp Model Deployment for ClearML", version="0.1.0",
                  description="An OpenAI-compatible endpoint serving a GGUF model in-process.",
                  openapi_url=None, docs_url=None, redoc_url=None)
    app.state.runtime = runtime
    app.state.started = time.time()
    auth = APIKeyAuth(runtime.api_key)
    runtime.stats.metrics.registry.register(LiveCollector(runtime))
    install_error_handlers(app)
    app.include_router(health_router())
    app.include_router(api_router(auth))
    app.include_router(extras_router(auth))
    app.include_router(dashboard_router(auth))
    app.add_middleware(StatsMiddleware, runtime=runtime)
    return app
