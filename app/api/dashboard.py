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

from app.runtime import Runtime


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
        runtime: Runtime = request.app.state.runtime
        return JSONResponse({"status": runtime.display_status()}, headers={"Cache-Control": "no-store"})

    @router.get("/dashboard/data")
    async def data(request: Request) -> JSONResponse:
        runtime: Runtime = request.app.state.runtime
        props = runtime.properties
        body = {
            "status": runtime.display_status(),
            "idle_s": runtime.stats.idle_seconds(),
            "model": runtime.model_id,
            "app_url": props.get("App URL", ""),
            "api_base": props.get("API base", ""),
            "api_key": runtime.api_key,
            "test_command": props.get("test command", ""),
            "now": time.time(),
            "history": runtime.history.points(),
            "log": runtime.console.tail(),
        }
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    return router
