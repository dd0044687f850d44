"""API key check: Bearer or X-Api-Key, compared as SHA-256 digests in constant time."""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from typing import Optional

from fastapi import Request

from app.api.errors import APIError

log = logging.getLogger(__name__)

# Repeated failures are summarised at most this often, so a scan cannot flood the log.
FAILURE_LOG_INTERVAL_S = 60.0


def generate_key() -> str:
    return "sk-" + secrets.token_urlsafe(24)


def mask(secret: str) -> str:
    """A secret as it may appear in a log line: never whole."""
    if not secret:
        return ""
    if len(secret) <= 8:
        return "***"
    return secret[:3] + "…" + secret[-2:]


def presented_key(request: Request) -> Optional[str]:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = request.headers.get("x-api-key")
    return key.strip() if key else None


class APIKeyAuth:
    """A FastAPI dependency holding only the key's digest."""

    def __init__(self, api_key: str) -> None:
        self._digest = hashlib.sha256(api_key.encode("utf-8")).digest()
        self._failures = 0
        self._last_log = 0.0

    def matches(self, key: Optional[str]) -> bool:
        if key is None:
            return False
        candidate = hashlib.sha256(key.encode("utf-8", errors="surrogatepass")).digest()
        return secrets.compare_digest(candidate, self._digest)

    async def __call__(self, request: Request) -> None:
        key = presented_key(request)
        if self.matches(key):
            return
        self._note_failure(request)
        message = "Missing API key: send 'Authorization: Bearer KEY' or 'X-Api-Key: KEY'." if key is None \
            else "Incorrect API key provided."
        raise APIError(401, message, code="invalid_api_key", error_type="invalid_request_error",
                       headers={"WWW-Authenticate": "Bearer"})

    def _note_failure(self, request: Request) -> None:
        self._failures += 1
        now = time.monotonic()
        if now - self._last_log >= FAILURE_LOG_INTERVAL_S:
            client = request.client.host if request.client else "unknown"
            log.warning("rejected request without a valid API key from %s to %s (%d rejections so far)",
                        client, request.url.path, self._failures)
            self._last_log = now
