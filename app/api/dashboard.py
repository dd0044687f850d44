"""The built-in deployment dashboard: one static page and two JSON endpoints.

The page itself holds no secret and is open, like /health; so is the bare status. Everything else (the
endpoint details, the key, the charts and the console tail) comes from /dashboard/data behind the API key.
The data is what the reporter already collected: no second sampler.
"""

from __future__ import annotations

import time
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse

from app.api.context import ServingContext


def page() -> str:
    return resources.files("app.api").joinpath("static/dashboard.html").read_text(encoding="utf-8")


def dashboard_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)
    html = page()

    @router.get("/")
    @router.get("/dashboard")
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    @router.get("/dashboard/status")
    async def status(request: Request) -> JSONResponse:
        context: ServingContext = request.app.state.context
        return JSONResponse({"status": context.lifecycle.state.shown}, headers={"Cache-Control": "no-store"})

    @router.get("/dashboard/data")
    async def data(request: Request) -> JSONResponse:
        context: ServingContext = request.app.state.context
        body = {
            "status": context.lifecycle.state.shown,
            "idle_s": context.stats.idle_seconds(),
            "model": context.model_id,
            "app_url": context.endpoint.app_url,
            "api_base": context.endpoint.api_base,
            "api_key": context.api_key,
            "test_command": context.endpoint.test_command,
            "now": time.time(),
            "history": context.history.points(),
            "log": context.console.tail(),
        }
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    return router
