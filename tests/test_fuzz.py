"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis), against the fake engine.

Bounded: a fixed number of examples per operation, derandomised so CI is repeatable. Every response must be
below 500, and every error must have OpenAI's shape.
"""

from __future__ import annotations

import json

import schemathesis
from hypothesis import HealthCheck, settings

from app.api.app import create_app
from app.runtime import Runtime
from tests.conftest import API_KEY
from tests.fake_engine import FakeEngine

MAX_EXAMPLES = 25


def fuzz_app():  # type: ignore[no-untyped-def]
    engine = FakeEngine(n_ctx_seq=4096, parallel=4, max_queue=64)
    return create_app(Runtime(api_key=API_KEY, model_id=engine.model_id, engine=engine, state="ready"))


schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app(), headers={"X-Api-Key": API_KEY})


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_500_and_errors_are_openai_shaped(case: schemathesis.Case) -> None:
    response = case.call(headers={"X-Api-Key": API_KEY})
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
    if response.status_code >= 400:
        body = json.loads(response.text)
        assert set(body["error"]) >= {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
