"""Routing, auth, errors and queueing against the fake engine, through a real server and the openai client."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.conftest import API_KEY, ThreadedServer
from tests.fake_engine import FakeEngine


def client(server: ThreadedServer, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def test_health_is_open_and_reports_slots(fake_server: ThreadedServer) -> None:
    r = httpx.get(fake_server.url + "/health")
    assert r.status_code == 200
    assert r.json()["status"] == "ok"
    assert r.json()["slots_idle"] == 2


def test_health_is_503_while_loading() -> None:
    from app.api.context import ServingContext
    from app.lifecycle import Lifecycle

    with ThreadedServer(ServingContext(Lifecycle(), API_KEY, "m")) as server:
        r = httpx.get(server.url + "/health")
        assert r.status_code == 503
        assert r.json()["status"] == "loading"
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "x"}, headers={"X-Api-Key": API_KEY})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "model_not_ready"


def test_chat_completion(fake_server: ThreadedServer, fake_engine: FakeEngine) -> None:
    fake_engine.replies.append("Bonjour!")
    out = client(fake_server).chat.completions.create(
        model="anything", messages=[{"role": "user", "content": "hi"}], max_tokens=50)
    assert out.choices[0].message.content == "Bonjour!"
    assert out.choices[0].finish_reason == "stop"
    assert out.usage is not None and out.usage.completion_tokens == len("Bonjour!")
    req = fake_engine.requests[-1]
    assert fake_engine.detokenize(req.prompt_tokens) == "<user>hi<assistant>"
    assert req.max_tokens == 50
    assert "<end>" in req.stop  # the template's own stop string


def test_chat_stream_with_usage(fake_server: ThreadedServer, fake_engine: FakeEngine) -> None:
    fake_engine.replies.append("abc def")
    chunks = list(client(fake_server).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "abc def"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 7


def test_max_completion_tokens_and_length(fake_server: ThreadedServer, fake_engine: FakeEngine) -> None:
    fake_engine.replies.append("0123456789")
    out = client(fake_server).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=4)
    assert out.choices[0].message.content == "0123"
    assert out.choices[0].finish_reason == "length"


def test_stop_strings_are_cut(fake_server: ThreadedServer, fake_engine: FakeEngine) -> None:
    fake_engine.replies.append("one, two STOP three")
    out = client(fake_server).completions.create(model="m", prompt="count", stop=["STOP"], max_tokens=50)
    assert out.choices[0].text == "one, two "
    assert out.choices[0].finish_reason == "stop"


def test_completion_list_prompt_n_and_echo(fake_server: ThreadedServer, fake_engine: FakeEngine) -> None:
    out = client(fake_server).completions.create(model="m", prompt=["a", "b"], n=2, echo=True, max_tokens=3)
    assert len(out.choices) == 4
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text.startswith("a") and out.choices[2].text.startswith("b")
    assert out.usage is not None and out.usage.prompt_tokens == 2


def test_logprobs_shapes(fake_server: ThreadedServer) -> None:
    c = client(fake_server)
    chat = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                     logprobs=True, top_logprobs=2, max_tokens=3)
    assert chat.choices[0].logprobs is not None and chat.choices[0].logprobs.content is not None
    assert len(chat.choices[0].logprobs.content) == 3
    assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 2
    comp = c.completions.create(model="m", prompt="x", logprobs=1, max_tokens=3)
    assert comp.choices[0].logprobs is not None
    assert len(comp.choices[0].logprobs.tokens or []) == 3


def test_embeddings(fake_server: ThreadedServer) -> None:
    out = client(fake_server).embeddings.create(model="m", input=["hello", "hi"])
    assert [d.index for d in out.data] == [0, 1]
    assert out.data[0].embedding[0] == 5.0


def test_embeddings_disabled_says_how_to_enable(fake_server: ThreadedServer, fake_engine: FakeEngine) -> None:
    fake_engine.embeddings_enabled = False
    with pytest.raises(openai.BadRequestError) as err:
        client(fake_server).embeddings.create(model="m", input="hello")
    assert "--embeddings" in err.value.body["message"]  # type: ignore[index]


def test_models(fake_server: ThreadedServer) -> None:
    models = client(fake_server).models.list()
    assert [m.id for m in models.data] == ["fake-model.gguf"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"X-Api-Key": "wrong"},
                                     {"Authorization": "Basic " + API_KEY}])
def test_auth_required(fake_server: ThreadedServer, headers: dict[str, str]) -> None:
    for method, path in [("GET", "/v1/models"), ("GET", "/v1/models/fake-model.gguf"), ("POST", "/v1/chat/completions"),
                         ("POST", "/v1/completions"), ("POST", "/v1/embeddings"), ("POST", "/tokenize"),
                         ("POST", "/detokenize"), ("GET", "/metrics"), ("GET", "/openapi.json")]:
        r = httpx.request(method, fake_server.url + path, headers=headers, json={})
        assert r.status_code == 401, path
        assert r.json()["error"]["code"] == "invalid_api_key"


def test_x_api_key_accepted(fake_server: ThreadedServer) -> None:
    r = httpx.get(fake_server.url + "/v1/models", headers={"X-Api-Key": API_KEY})
    assert r.status_code == 200


def test_openai_client_auth_error(fake_server: ThreadedServer) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(fake_server, key="nope").models.list()


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 5}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 1000}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}, "response_format"),
])
def test_bad_input_is_400_openai_shaped(fake_server: ThreadedServer, body: dict, param: str) -> None:
    r = httpx.post(fake_server.url + "/v1/chat/completions", json=body, headers={"X-Api-Key": API_KEY})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    # ... and the server keeps serving
    assert httpx.get(fake_server.url + "/v1/models", headers={"X-Api-Key": API_KEY}).status_code == 200


def test_body_without_json_content_type_is_400(fake_server: ThreadedServer) -> None:
    r = httpx.post(fake_server.url + "/v1/chat/completions", content=b'{"messages": []}',
                   headers={"X-Api-Key": API_KEY})
    assert r.status_code == 400 and "Content-Type" in r.json()["error"]["message"]


def test_malformed_json(fake_server: ThreadedServer) -> None:
    for content in (b"{bad", b"\xff\xfe\x00", b"[1, 2]"):
        r = httpx.post(fake_server.url + "/v1/completions", content=content,
                       headers={"X-Api-Key": API_KEY, "Content-Type": "application/json"})
        assert r.status_code == 400, (content, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_body_too_large_is_413(fake_server: ThreadedServer) -> None:
    r = httpx.post(fake_server.url + "/v1/completions", content=b"x" * (9 * 1024 * 1024),
                   headers={"X-Api-Key": API_KEY, "Content-Type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


def test_context_length_exceeded(fake_server: ThreadedServer) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client(fake_server).completions.create(model="m", prompt="x" * 300, max_tokens=5)
    assert err.value.code == "context_length_exceeded"


def test_unknown_route_is_openai_shaped_404(fake_server: ThreadedServer) -> None:
    r = httpx.get(fake_server.url + "/v1/nothing", headers={"X-Api-Key": API_KEY})
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found_error"


def test_queue_full_is_429_with_retry_after(fake_engine: FakeEngine) -> None:
    from app.api.context import ServingContext

    fake_engine.token_delay = 0.05
    fake_engine.default_reply = "x" * 40
    with ThreadedServer(ServingContext.serving(fake_engine, API_KEY)) as server:
        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, headers={"X-Api-Key": API_KEY}, timeout=30) as c:
                return list(await asyncio.gather(*[
                    c.post("/v1/completions", json={"prompt": "p", "max_tokens": 40}) for _ in range(6)]))
        responses = asyncio.run(run())
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 200, 200, 429, 429]  # 2 running + 2 queued
    rejected = [r for r in responses if r.status_code == 429]
    assert all(r.headers["Retry-After"] for r in rejected)
    assert rejected[0].json()["error"]["type"] == "rate_limit_error"


def test_stream_disconnect_cancels_generation(fake_engine: FakeEngine) -> None:
    from app.api.context import ServingContext

    fake_engine.token_delay = 0.02
    fake_engine.default_reply = "y" * 200
    with ThreadedServer(ServingContext.serving(fake_engine, API_KEY)) as server:
        with httpx.stream("POST", server.url + "/v1/completions", headers={"X-Api-Key": API_KEY},
                          json={"prompt": "p", "max_tokens": 200, "stream": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 3:
                    break
        import time
        end = time.time() + 5
        while not fake_engine.cancelled and time.time() < end:
            time.sleep(0.02)
        assert fake_engine.cancelled, "generation was not cancelled after the client left"
        assert fake_engine.in_system == 0


def test_non_stream_disconnect_cancels_generation(fake_engine: FakeEngine) -> None:
    import time

    from app.api.context import ServingContext

    fake_engine.token_delay = 0.02
    fake_engine.default_reply = "z" * 200
    with ThreadedServer(ServingContext.serving(fake_engine, API_KEY)) as server:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", headers={"X-Api-Key": API_KEY},
                       json={"prompt": "p", "max_tokens": 200}, timeout=0.3)
        end = time.time() + 5
        while not fake_engine.cancelled and time.time() < end:
            time.sleep(0.02)
        assert fake_engine.cancelled


def test_tokenize_detokenize(fake_server: ThreadedServer) -> None:
    h = {"X-Api-Key": API_KEY}
    toks = httpx.post(fake_server.url + "/tokenize", json={"content": "hey"}, headers=h).json()["tokens"]
    assert toks == [ord("h"), ord("e"), ord("y")]
    pieces = httpx.post(fake_server.url + "/tokenize", json={"content": "hey", "with_pieces": True},
                        headers=h).json()["tokens"]
    assert pieces[0] == {"id": ord("h"), "piece": "h"}
    assert httpx.post(fake_server.url + "/detokenize", json={"tokens": toks}, headers=h).json() == {"content": "hey"}


def test_sse_wire_format(fake_server: ThreadedServer) -> None:
    with httpx.stream("POST", fake_server.url + "/v1/chat/completions", headers={"X-Api-Key": API_KEY},
                      json={"messages": [{"role": "user", "content": "x"}], "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        assert line.startswith("data: ")
        assert json.loads(line[6:])["object"] == "chat.completion.chunk"


@pytest.mark.parametrize("content", [
    b"[" * 100_000 + b"]" * 100_000,  # deeply nested: must not reach Python's recursion limit as a 500
    b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
])
def test_deeply_nested_json_is_400(fake_server: ThreadedServer, content: bytes) -> None:
    r = httpx.post(fake_server.url + "/v1/chat/completions", content=content,
                   headers={"X-Api-Key": API_KEY, "Content-Type": "application/json"})
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": 5},
    {"type": "nonsense"},
    {"$ref": "#/definitions/missing"},
])
def test_invalid_json_schema_is_400_and_the_next_request_is_served(fake_server: ThreadedServer, schema: dict) -> None:
    body = {"messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}
    r = httpx.post(fake_server.url + "/v1/chat/completions", json=body, headers={"X-Api-Key": API_KEY})
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["param"] == "response_format"
    ok = httpx.post(fake_server.url + "/v1/chat/completions", headers={"X-Api-Key": API_KEY},
                    json={"messages": [{"role": "user", "content": "x"}]})
    assert ok.status_code == 200


def test_huge_max_tokens_is_context_length_exceeded(fake_server: ThreadedServer) -> None:
    r = httpx.post(fake_server.url + "/v1/completions", headers={"X-Api-Key": API_KEY},
                   json={"prompt": "x", "max_tokens": 10**12})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
