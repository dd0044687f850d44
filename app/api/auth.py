"""API key check: Bearer or X-Api-Key, compared as SHA-256 digests in constant time.

The check runs as ASGI middleware, before any route reads the body: a caller without the key learns nothing
about the request's validity (no 400 for a bad body before the 401) and never makes the app parse anything.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import APIError, send_error

log = logging.getLogger(__name__)

# Repeated failures are summarised at most this often, so a scan cannot flood the log.
FAILURE_LOG_INTERVAL_S = 60.0

# What answers without the key: the probe, the dashboard's page (no secret in it) and its bare status.
OPEN_PATHS = frozenset({"/health", "/", "/dashboard", "/dashboard/status"})

# Set in the ASGI scope when the caller presented the right key.
AUTHENTICATED = "app.authenticated"


def generate_key() -> str:
    return "sk-" + secrets.token_urlsafe(24)


def presented_key(headers: Headers) -> str | None:
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = headers.get("x-api-key")
    return key.strip() if key else None


class APIKeyAuth:
    """Holds only the key's digest; `check` raises the 401 the client sees."""

    def __init__(self, api_key: str) -> None:
        self._digest = hashlib.sha256(api_key.encode("utf-8")).digest()
        self._failures = 0
        self._last_log = 0.0

    def matches(self, key: str | None) -> bool:
        if key is None:
            return False
        candidate = hashlib.sha256(key.encode("utf-8", errors="surrogatepass")).digest()
        return secrets.compare_digest(candidate, self._digest)

    def check(self, headers: Headers, client: str, path: str) -> None:
        key = presented_key(headers)
        if self.matches(key):
            return
        self._note_failure(client, path)
        message = "Missing API key: send 'Authorization: Bearer KEY' or 'X-Api-Key: KEY'." if key is None \
            else "Incorrect API key provided."
        raise APIError(401, message, code="invalid_api_key", error_type="invalid_request_error",
                       headers={"WWW-Authenticate": "Bearer"})

    def _note_failure(self, client: str, path: str) -> None:
        self._failures += 1
        now = time.monotonic()
        if now - self._last_log >= FAILURE_LOG_INTERVAL_S:
            log.warning("rejected request without a valid API key from %s to %.200s (%d rejections so far)",
                        client, path, self._failures)
            self._last_log = now


class AuthMiddleware:
    """Every HTTP route but OPEN_PATHS needs the key; unknown paths too, so a scan learns nothing."""

    def __init__(self, app: ASGIApp, auth: APIKeyAuth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        try:
            self.auth.check(Headers(scope=scope), client[0] if client else "unknown", scope["path"])
        except APIError as exc:
            await send_error(send, exc, scope["path"])
            return
        scope[AUTHENTICATED] = True
        await self.app(scope, receive, send)
