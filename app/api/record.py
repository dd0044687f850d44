"""What a route tells the stats middleware about its request (tokens, time to first token), typed."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.types import Scope

_KEY = "app.record"


@dataclass
class RequestRecord:
    ttft_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def record_of(scope: Scope) -> RequestRecord:
    """The request's record, created on first use; the middleware and the route share it through the scope."""
    record = scope.get(_KEY)
    if record is None:
        record = scope[_KEY] = RequestRecord()
    assert isinstance(record, RequestRecord)
    return record
