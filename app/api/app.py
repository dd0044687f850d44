"""create_app: the FastAPI application, its middleware and its routers."""

from __future__ import annotations

import logging
import time

from fastapi import FastAPI, HTTPException
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.auth import AUTHENTICATED, APIKeyAuth, AuthMiddleware
from app.api.context import ServingContext
from app.api.dashboard import dashboard_router
from app.api.errors import APIError, install_error_handlers, send_error
from app.api.record import record_of
from app.api.routes import api_router, extras_router, health_router
from app.config import MAX_BODY_BYTES
from app.telemetry.gauges import LiveCollector
from app.telemetry.stats import RequestStats

log = logging.getLogger(__name__)

# Probes, scrapes and the dashboard are not use: they are neither counted nor keep an idle app alive.
UNCOUNTED_PATHS = frozenset({"/health", "/metrics", "/", "/dashboard", "/dashboard/status", "/dashboard/data"})
# Answers that say the caller did not reach the API: never activity, whoever sent them.
NOT_USE = frozenset({401, 403, 404, 405})


class StatsMiddleware:
    """Counts every API request from its start to its last byte (streams included).

    Only an authenticated request that reached a route is activity: a scan (401, 404, 405) is counted but
    never keeps an idle instance alive.
    """

    def __init__(self, app: ASGIApp, stats: RequestStats) -> None:
        self.app = app
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNCOUNTED_PATHS:
            await self.app(scope, receive, send)
            return
        stats = self.stats
        record = record_of(scope)
        status = {"code": 500}
        started = stats.begin()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            active = bool(scope.get(AUTHENTICATED)) and status["code"] not in NOT_USE
            stats.end(scope["path"], status["code"], started, record.ttft_s, record.prompt_tokens,
                      record.completion_tokens, active=active)


class BodyLimitMiddleware:
    """Caps the request body (after the key check, so a keyless caller gets 401 whatever it sends)."""

    def __init__(self, app: ASGIApp, max_body: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"The request body is larger than the limit of {self.max_body} bytes."
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await send_error(send, APIError(413, message, code="request_too_large"), scope["path"])
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_body:
                    # FastAPI re-raises HTTPException from body parsing, so this reaches our error handler.
                    raise HTTPException(413, message)
            return msg

        await self.app(scope, limited_receive, send)


def create_app(context: ServingContext) -> FastAPI:
    """The whole HTTP surface, bound to one ServingContext."""
    # FastAPI's own /openapi.json, /docs and /redoc would answer without the key (and the docs pages load
    # from a CDN): the schema is served behind the key by extras_router instead.
    app = FastAPI(title="llama.cpp Model Deployment for ClearML", version="0.1.0",
                  description="An OpenAI-compatible endpoint serving a GGUF model in-process.",
                  openapi_url=None, docs_url=None, redoc_url=None,
                  # No trailing-slash redirects: their Location would be built from the client's Host header.
                  redirect_slashes=False)
    app.state.context = context
    app.state.started = time.time()
    context.stats.metrics.registry.register(LiveCollector(context.stats, context.hardware, context.lifecycle))
    install_error_handlers(app)
    app.include_router(health_router())
    app.include_router(api_router())
    app.include_router(extras_router())
    app.include_router(dashboard_router())
    # Added innermost first: stats see everything, then the key is checked, then the body is read.
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(AuthMiddleware, auth=APIKeyAuth(context.api_key))
    app.add_middleware(StatsMiddleware, stats=context.stats)
    if context.cors_origins:
        # Outermost: a preflight carries no key and is answered here; every answer, a 401 included, carries the
        # CORS headers so a browser page can read it. No credentials: the key is a header, never a cookie.
        app.add_middleware(CORSMiddleware, allow_origins=list(context.cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST", "HEAD", "OPTIONS"], allow_headers=["*"],
                           expose_headers=["Retry-After"], max_age=600)
    return app
