"""One error shape for every failure: OpenAI's `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from app.api.protocol import ErrorDetail, ErrorResponse
from app.engine.chat import ChatTemplateError
from app.engine.types import EngineError, EngineUnavailableError, InvalidRequestError, QueueFullError

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """Raised by handlers for a precise client-facing error."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 error_type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.error_type = error_type or _STATUS_TYPES.get(status, "server_error")
        self.headers = headers


# Engine failures as HTTP answers: the engine knows nothing of HTTP. The most specific class wins (MRO order).
_ENGINE_STATUS: dict[type[EngineError], tuple[int, str]] = {
    InvalidRequestError: (400, "invalid_request_error"),
    QueueFullError: (429, "rate_limit_error"),
    EngineUnavailableError: (503, "service_unavailable"),
    EngineError: (500, "server_error"),
}


def engine_status(exc: EngineError) -> tuple[int, str]:
    """(HTTP status, OpenAI error type) for an engine failure."""
    for cls in type(exc).__mro__:
        if cls in _ENGINE_STATUS:
            return _ENGINE_STATUS[cls]
    return 500, "server_error"


def error_body(message: str, error_type: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """The one error shape, as a dict (the body of every error answer)."""
    return ErrorResponse(error=ErrorDetail(message=message, type=error_type, param=param, code=code)).model_dump()


def error_response_body(exc: EngineError) -> ErrorResponse:
    """An engine failure in the wire shape (also the error event of a stream)."""
    _, error_type = engine_status(exc)
    return ErrorResponse(error=ErrorDetail(message=str(exc), type=error_type, param=exc.param, code=exc.code))


# Anthropic's error types by HTTP status, for the Messages routes (its clients read `error.type`).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def anthropic_route(path: str) -> bool:
    """The Anthropic Messages routes answer errors in Anthropic's shape."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    """`{"type": "error", "error": {"type", "message"}}`: Anthropic's error body (and stream error event)."""
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}


def _body_for(exc: APIError, path: str) -> dict[str, Any]:
    if anthropic_route(path):
        return anthropic_error(exc.status, exc.message)
    return error_body(exc.message, exc.error_type, exc.param, exc.code)


def error_response(exc: APIError, path: str = "") -> JSONResponse:
    return JSONResponse(_body_for(exc, path), status_code=exc.status, headers=exc.headers)


async def send_error(send: Send, exc: APIError, path: str = "") -> None:
    """The same error as a raw ASGI response, for middleware that answers before any route runs."""
    data = json.dumps(_body_for(exc, path)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (exc.headers or {}).items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def from_engine_error(exc: EngineError) -> APIError:
    status, error_type = engine_status(exc)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if isinstance(exc, QueueFullError) else None
    return APIError(status, str(exc), exc.code, exc.param, error_type, headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "unsupported_field":
        field = str((first.get("ctx") or {}).get("field"))
        return f"{field}: this server does not support this field", field
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if not loc and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
        return "the request body must be a JSON object (send Content-Type: application/json)", None
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return (f"{param}: {msg}{more}" if param else f"{msg}{more}"), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc, request.url.path)

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError) -> JSONResponse:
        return error_response(from_engine_error(exc), request.url.path)

    @app.exception_handler(ChatTemplateError)
    async def _template_error(request: Request, exc: ChatTemplateError) -> JSONResponse:
        return error_response(APIError(400, str(exc), param="messages"), request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(APIError(400, message, param=param), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return error_response(APIError(exc.status_code, message, headers=getattr(exc, "headers", None)),
                              request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(APIError(500, "internal server error", error_type="server_error"), request.url.path)
