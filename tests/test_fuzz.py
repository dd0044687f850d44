"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis), against the fake engine.

Bounded: a fixed number of examples per operation, derandomised so CI is repeatable. Every response must be
below 500, and every error must have its surface's shape (OpenAI's, or Anthropic's on /v1/messages).
"""

from __future__ import annotations

import json

import schemathesis
from hypothesis import HealthCheck, given, settings

from app.api.app import create_app
from app.api.context import ServingContext
from tests.conftest import API_KEY, AppProcess
from tests.fake_engine import FakeEngine

MAX_EXAMPLES = 25


def assert_error_shape(path: str, text: str) -> None:
    body = json.loads(text)
    if path.startswith("/v1/messages"):
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    else:
        assert set(body["error"]) >= {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def fuzz_app():  # type: ignore[no-untyped-def]
    engine = FakeEngine(n_ctx_seq=4096, parallel=4, max_queue=64)
    return create_app(ServingContext.serving(engine, API_KEY))


schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app(), headers={"X-Api-Key": API_KEY})


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_500_and_errors_are_openai_shaped(case: schemathesis.Case) -> None:
    response = case.call(headers={"X-Api-Key": API_KEY})
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
    if response.status_code >= 400:
        assert_error_shape(case.path, response.text)


# --- a smaller run against the real model through the real app -----------------------------------------


def test_real_model_no_500(real_app: AppProcess) -> None:
    """4 derandomised examples per operation against the real app on the real model."""
    real = schemathesis.openapi.from_url(real_app.url + "/openapi.json", headers={"X-Api-Key": API_KEY})
    tried = 0
    for result in real.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
                  database=None)
        def check(case: schemathesis.Case) -> None:
            nonlocal tried
            if isinstance(case.body, dict):
                # Keep each generated request small on 2 cores; every other field stays as generated.
                if isinstance(case.body.get("max_tokens"), int) and case.body["max_tokens"] > 8:
                    case.body["max_tokens"] = 8
                case.body.pop("max_completion_tokens", None)
                if isinstance(case.body.get("max_output_tokens"), int) and case.body["max_output_tokens"] > 8:
                    case.body["max_output_tokens"] = 8
                if isinstance(case.body.get("n"), int) and case.body["n"] > 2:
                    case.body["n"] = 2
                case.body.setdefault("max_output_tokens" if case.path == "/v1/responses" else "max_tokens", 8)
            response = case.call(base_url=real_app.url, headers={"X-Api-Key": API_KEY}, timeout=120)
            tried += 1
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
            if response.status_code >= 400:
                assert_error_shape(case.path, response.text)

        check()
    assert tried >= 9
