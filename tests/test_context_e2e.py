"""The default context on the real app: the demo model's trained 32,768 tokens (memory allowing), any one request
may use all of it, concurrent long requests share it, and a request larger than it is refused at once."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import API_KEY, AppProcess

KEY = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def default_app(demo_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppProcess]:
    """The app with its default context and parallel settings."""
    app = AppProcess(["--offline", "--model", demo_model, "--port", "0", "--api-key", API_KEY,
                      "--idle-time-limit-hours", "0"],
                     env={"CLEARML_CACHE_DIR": str(tmp_path_factory.mktemp("default-context"))})
    app.start().wait_ready()
    yield app
    app.stop()


@pytest.fixture
def client(default_app: AppProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=default_app.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)


def text_of(app: AppProcess, n_tokens: int, seed: str) -> str:
    """A prompt of about `n_tokens` tokens (checked with the server's tokenizer)."""
    words = [f"{seed}{i % 97}" for i in range(n_tokens)]
    text = " ".join(words)
    count = len(httpx.post(app.url + "/tokenize", headers=KEY, json={"content": text}).json()["tokens"])
    return " ".join(words[: max(1, len(words) * n_tokens // count)])


def test_health_reports_the_trained_context(default_app: AppProcess) -> None:
    health = httpx.get(default_app.url + "/health").json()
    assert health["n_ctx"] == health["max_request_tokens"] == health["n_ctx_train"] == 32768
    assert health["kv_cache_type_k"] == health["kv_cache_type_v"] == "f16"
    assert "context: 32768 tokens" in default_app.log


def test_a_12000_token_prompt_is_served(client: openai.OpenAI, default_app: AppProcess) -> None:
    out = client.completions.create(model="m", prompt=text_of(default_app, 12000, "doc"), max_tokens=8,
                                    temperature=0)
    assert out.usage is not None and 11500 <= out.usage.prompt_tokens <= 12500
    assert out.choices[0].finish_reason in ("length", "stop")


def test_four_concurrent_3000_token_requests_complete_in_full(client: openai.OpenAI,
                                                              default_app: AppProcess) -> None:
    prompts = [text_of(default_app, 3000, seed) for seed in ("alpha", "beta", "gamma", "delta")]

    def one(prompt: str) -> openai.types.Completion:
        return client.completions.create(model="m", prompt=prompt, max_tokens=32, temperature=0,
                                         extra_body={"ignore_eos": True})

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, prompts))
    for out in results:
        assert out.choices[0].finish_reason == "length"
        assert out.usage is not None and out.usage.completion_tokens == 32 and out.usage.prompt_tokens >= 2900


def test_a_request_larger_than_the_context_is_refused_at_once(client: openai.OpenAI,
                                                              default_app: AppProcess) -> None:
    started = time.monotonic()
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="m", prompt=text_of(default_app, 30000, "big"), max_tokens=4000)
    assert err.value.code == "context_length_exceeded"
    assert "32768" in str(err.value)
    assert time.monotonic() - started < 10  # refused before any decoding


def test_a_quantized_kv_cache_serves(demo_model: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    app = AppProcess(["--offline", "--model", demo_model, "--port", "0", "--api-key", API_KEY, "--n-ctx", "8192",
                      "--cache-type-k", "q8_0", "--cache-type-v", "q8_0", "--flash-attn", "on",
                      "--idle-time-limit-hours", "0"],
                     env={"CLEARML_CACHE_DIR": str(tmp_path_factory.mktemp("q8-cache"))})
    app.start().wait_ready()
    try:
        health = httpx.get(app.url + "/health").json()
        assert health["kv_cache_type_k"] == health["kv_cache_type_v"] == "q8_0" and health["n_ctx"] == 8192
        out = openai.OpenAI(base_url=app.url + "/v1", api_key=API_KEY, max_retries=0).completions.create(
            model="m", prompt="Once upon a time", max_tokens=8, temperature=0)
        assert out.usage is not None and out.usage.completion_tokens > 0
    finally:
        app.stop()
