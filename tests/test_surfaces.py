"""The Responses and Anthropic Messages surfaces, CORS and the path aliases, against the scripted fake engine:
request translation, event sequences, errors in each surface's shape, with the official clients. The same
surfaces on the real model are in test_surfaces_e2e.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from app.api.context import ServingContext
from app.engine.toolcalls import format_named
from tests.conftest import API_KEY, ThreadedServer
from tests.fake_engine import FakeEngine

CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
FLAT_TOOL = {"type": "function", "name": "get_weather", "description": "Weather in a city",
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CLAUDE_TOOL = {"name": "get_weather", "description": "Weather in a city",
               "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
KEY = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def engine() -> FakeEngine:
    fake = FakeEngine()
    fake.chat_format = format_named("hermes")
    return fake


@pytest.fixture
def server(engine: FakeEngine) -> Iterator[ThreadedServer]:
    with ThreadedServer(ServingContext.serving(engine, API_KEY)) as running:
        yield running


@pytest.fixture
def oai(server: ThreadedServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture
def claude(server: ThreadedServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0)


def prompt_of(engine: FakeEngine, index: int = -1) -> str:
    return engine.detokenize(engine.requests[index].prompt_tokens)


# --- Responses -----------------------------------------------------------------------------------------------

def test_responses_plain_with_instructions(oai: openai.OpenAI, engine: FakeEngine) -> None:
    out = oai.responses.create(model="m", input="Hi", instructions="Be brief", max_output_tokens=40)
    assert out.status == "completed" and out.output_text == engine.default_reply
    assert out.id.startswith("resp_") and out.object == "response"
    assert prompt_of(engine) == "<system>Be brief<user>Hi<assistant>"
    assert engine.requests[-1].max_tokens == 40
    assert out.usage is not None and out.usage.output_tokens == len(engine.default_reply)
    assert out.usage.input_tokens == len(engine.requests[-1].prompt_tokens)


def test_responses_stream_event_sequence(oai: openai.OpenAI, engine: FakeEngine) -> None:
    events = list(oai.responses.create(model="m", input="Hi", stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == engine.default_reply
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == text and final.usage is not None and final.usage.output_tokens == len(text)


def test_responses_stream_helper_accumulates(oai: openai.OpenAI, engine: FakeEngine) -> None:
    with oai.responses.stream(model="m", input="Hi") as stream:
        for _ in stream:
            pass
        assert stream.get_final_response().output_text == engine.default_reply


def test_responses_max_output_tokens_is_incomplete(oai: openai.OpenAI) -> None:
    out = oai.responses.create(model="m", input="Hi", max_output_tokens=3)
    assert out.status == "incomplete" and out.incomplete_details is not None
    assert out.incomplete_details.reason == "max_output_tokens" and out.output_text == "Hel"
    events = list(oai.responses.create(model="m", input="Hi", max_output_tokens=3, stream=True))
    assert events[-1].type == "response.incomplete"


def test_responses_function_call_round_trip(oai: openai.OpenAI, engine: FakeEngine) -> None:
    engine.replies.append(CALL)
    first = oai.responses.create(model="m", input="Weather in Paris?", tools=[FLAT_TOOL],  # type: ignore[list-item]
                                 tool_choice={"type": "function", "name": "get_weather"})
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Paris"}
    assert "<tool_call>" not in first.output_text
    assert engine.requests[-1].sampling.grammar  # the named choice is forced by a grammar
    second = oai.responses.create(model="m", tools=[FLAT_TOOL], input=[  # type: ignore[list-item]
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temperature_c": 18}'},
    ])
    assert second.output_text == engine.default_reply
    # The history reached the template as Chat Completions messages: the call, then the tool's answer.
    assert prompt_of(engine).endswith('<assistant><tool>{"temperature_c": 18}<assistant>')


def test_responses_streamed_function_call(oai: openai.OpenAI, engine: FakeEngine) -> None:
    engine.replies.append(CALL)
    events = list(oai.responses.create(model="m", input="w", tools=[FLAT_TOOL], stream=True))  # type: ignore[list-item]
    kinds = [e.type for e in events]
    assert "response.output_text.delta" not in kinds
    added = next(e for e in events if e.type == "response.output_item.added")
    assert added.item.type == "function_call" and added.item.name == "get_weather"  # type: ignore[union-attr]
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(arguments) == {"city": "Paris"}
    final = events[-1].response  # type: ignore[union-attr]
    assert [item.type for item in final.output] == ["function_call"]


def test_responses_reasoning_is_its_own_item(server: ThreadedServer, engine: FakeEngine) -> None:
    engine.chat_format = format_named("deepseek_r1")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    engine.replies.append("<think>Paris is in France.</think>Sunny.")
    out = client.responses.create(model="m", input="w")
    assert [item.type for item in out.output] == ["reasoning", "message"]
    assert out.output_text == "Sunny."
    assert out.output[0].content[0].text == "Paris is in France."  # type: ignore[union-attr, index]
    engine.replies.append("<think>Paris is in France.</think>Sunny.")
    events = list(client.responses.create(model="m", input="w", stream=True))
    thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")  # type: ignore[union-attr]
    assert thought == "Paris is in France."
    assert events[-1].response.output_text == "Sunny."  # type: ignore[union-attr]


def test_responses_text_format_json_schema_sets_a_grammar(oai: openai.OpenAI, engine: FakeEngine) -> None:
    engine.replies.append('{"city": "Paris"}')
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    out = oai.responses.create(model="m", input="x", text={"format": {"type": "json_schema", "name": "place",
                                                                      "schema": schema, "strict": True}})
    assert engine.requests[-1].sampling.grammar and "city" in engine.requests[-1].sampling.grammar
    assert json.loads(out.output_text) == {"city": "Paris"}


@pytest.mark.parametrize(("extra", "param"), [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"store": True}, "store"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"background": True}, "background"),
    ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"frequency_penalty": 1}, "frequency_penalty"),
])
def test_responses_refuses_what_needs_server_state(server: ThreadedServer, extra: dict[str, Any],
                                                  param: str) -> None:
    r = httpx.post(server.url + "/v1/responses", headers=KEY, json={"input": "x", **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_responses_previous_response_id_says_stateless(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        oai.responses.create(model="m", input="x", previous_response_id="resp_123")
    assert "stateless" in str(err.value)


def test_responses_refuses_images(server: ThreadedServer) -> None:
    r = httpx.post(server.url + "/v1/responses", headers=KEY, json={"input": [
        {"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input.0.content.0"


def test_responses_text_parts_are_joined_with_a_newline(oai: openai.OpenAI, engine: FakeEngine) -> None:
    oai.responses.create(model="m", input=[{"role": "user", "content": [{"type": "input_text", "text": "a"},
                                                                        {"type": "input_text", "text": "b"}]}])
    assert prompt_of(engine) == "<user>a\nb<assistant>"


# --- Anthropic Messages ---------------------------------------------------------------------------------------

def test_messages_plain(claude: anthropic.Anthropic, engine: FakeEngine) -> None:
    out = claude.messages.create(model="m", max_tokens=64, system="Be brief",
                                 messages=[{"role": "user", "content": "Hi"}])
    assert out.type == "message" and out.role == "assistant" and out.id.startswith("msg_")
    assert [b.type for b in out.content] == ["text"] and out.content[0].text == engine.default_reply  # type: ignore[union-attr]
    assert out.stop_reason == "end_turn" and out.stop_sequence is None
    assert out.usage.input_tokens == len(engine.requests[-1].prompt_tokens)
    assert out.usage.output_tokens == len(engine.default_reply)
    assert prompt_of(engine) == "<system>Be brief<user>Hi<assistant>"


def test_messages_stream_event_sequence(claude: anthropic.Anthropic, engine: FakeEngine) -> None:
    with claude.messages.stream(model="m", max_tokens=64, messages=[{"role": "user", "content": "Hi"}]) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[1] == "content_block_start"
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert final.content[0].text == engine.default_reply  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == len(engine.default_reply)


def test_messages_stop_sequence_and_max_tokens(claude: anthropic.Anthropic) -> None:
    out = claude.messages.create(model="m", max_tokens=64, stop_sequences=["fake"],
                                 messages=[{"role": "user", "content": "Hi"}])
    assert out.stop_reason == "stop_sequence" and out.stop_sequence == "fake"
    assert out.content[0].text.strip() == "Hello from the"  # type: ignore[union-attr]
    out = claude.messages.create(model="m", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    assert out.stop_reason == "max_tokens"


def test_messages_tool_use_round_trip(claude: anthropic.Anthropic, engine: FakeEngine) -> None:
    engine.replies.append(CALL)
    first = claude.messages.create(model="m", max_tokens=80, tools=[CLAUDE_TOOL],  # type: ignore[list-item]
                                   tool_choice={"type": "tool", "name": "get_weather"},
                                   messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert first.stop_reason == "tool_use"
    use = first.content[-1]
    assert use.type == "tool_use" and use.name == "get_weather" and use.input == {"city": "Paris"}
    assert engine.requests[-1].sampling.grammar
    second = claude.messages.create(model="m", max_tokens=80, tools=[CLAUDE_TOOL], messages=[  # type: ignore[list-item]
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},  # type: ignore[misc]
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 C"}]},
    ])
    assert second.stop_reason == "end_turn" and second.content[0].text == engine.default_reply  # type: ignore[union-attr]
    assert prompt_of(engine).endswith("<assistant><tool>18 C<assistant>")


def test_messages_streamed_tool_use(claude: anthropic.Anthropic, engine: FakeEngine) -> None:
    engine.replies.append(CALL)
    with claude.messages.stream(model="m", max_tokens=80, tools=[CLAUDE_TOOL],  # type: ignore[list-item]
                                tool_choice={"type": "any"},
                                messages=[{"role": "user", "content": "w"}]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["tool_use"] and final.stop_reason == "tool_use"
    assert final.content[0].input == {"city": "Paris"}  # type: ignore[union-attr]
    deltas = [e for e in events if e.type == "content_block_delta"]
    assert deltas and all(e.delta.type == "input_json_delta" for e in deltas)  # type: ignore[union-attr]


def test_messages_thinking_block(claude: anthropic.Anthropic, engine: FakeEngine) -> None:
    engine.chat_format = format_named("deepseek_r1")
    engine.replies.append("<think>Paris is in France.</think>Sunny.")
    out = claude.messages.create(model="m", max_tokens=80, messages=[{"role": "user", "content": "w"}])
    assert [b.type for b in out.content] == ["thinking", "text"]
    assert out.content[0].thinking == "Paris is in France." and out.content[1].text == "Sunny."  # type: ignore[union-attr]


def test_count_tokens_matches_the_prompt(claude: anthropic.Anthropic, engine: FakeEngine) -> None:
    messages: Any = [{"role": "user", "content": "How many?"}]
    counted = claude.messages.count_tokens(model="m", system="S", messages=messages)
    out = claude.messages.create(model="m", max_tokens=4, system="S", messages=messages)
    assert counted.input_tokens == out.usage.input_tokens + (out.usage.cache_read_input_tokens or 0)
    assert counted.input_tokens == len("<system>S<user>How many?<assistant>")


def test_messages_errors_are_anthropic_shaped(server: ThreadedServer) -> None:
    bad = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as auth_err:
        bad.messages.create(model="m", max_tokens=4, messages=[{"role": "user", "content": "x"}])
    assert auth_err.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                              "message": "Incorrect API key provided."}}
    r = httpx.post(server.url + "/v1/messages", headers={"x-api-key": API_KEY, "anthropic-version": "2023-06-01"},
                   json={"messages": [{"role": "user", "content": "x"}]})  # no max_tokens
    assert r.status_code == 400
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    r = httpx.post(server.url + "/v1/messages", headers={"x-api-key": API_KEY}, json={
        "max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]})
    assert r.status_code == 400 and "image" in r.json()["error"]["message"]
    # The OpenAI routes keep OpenAI's shape.
    r = httpx.post(server.url + "/v1/chat/completions", headers={"x-api-key": "wrong"}, json={})
    assert r.json()["error"]["code"] == "invalid_api_key"


# --- CORS ------------------------------------------------------------------------------------------------------

PREFLIGHT = {"Origin": "https://chat.example.org", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


def test_cors_preflight_is_allowed_by_default(server: ThreadedServer) -> None:
    r = httpx.options(server.url + "/v1/chat/completions", headers=PREFLIGHT)
    assert r.status_code in (200, 204)
    assert r.headers["access-control-allow-origin"] == "*"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in r.headers


def test_a_cross_origin_request_without_the_key_is_still_401(server: ThreadedServer) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Origin": "https://chat.example.org"},
                   json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401
    assert r.headers["access-control-allow-origin"] == "*"  # the page can read why
    r = httpx.get(server.url + "/dashboard/data", headers={"Origin": "https://chat.example.org"})
    assert r.status_code == 401  # the dashboard's data stays behind the key


def test_cors_lists_origins_or_is_switched_off(engine: FakeEngine) -> None:
    context = ServingContext.serving(engine, API_KEY)
    context.cors_origins = ("https://chat.example.org",)
    with ThreadedServer(context) as listed:
        assert httpx.options(listed.url + "/v1/models", headers=PREFLIGHT).status_code == 200
        other = httpx.options(listed.url + "/v1/models", headers={**PREFLIGHT, "Origin": "https://evil.example"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    context = ServingContext.serving(engine, API_KEY)
    context.cors_origins = ()
    with ThreadedServer(context) as off:
        r = httpx.options(off.url + "/v1/chat/completions", headers=PREFLIGHT)
        assert r.status_code >= 400 and "access-control-allow-origin" not in r.headers


# --- aliases and telemetry ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("alias", "method", "body"), [
    ("/chat/completions", "POST", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 5}),
    ("/completions", "POST", {"prompt": "x", "max_tokens": 5}),
    ("/embeddings", "POST", {"input": "abc"}),
    ("/models", "GET", None),
])
def test_aliases_answer_like_their_v1_routes(server: ThreadedServer, alias: str, method: str,
                                             body: dict[str, Any] | None) -> None:
    answers = [httpx.request(method, server.url + path, headers=KEY, json=body).json()
               for path in ("/v1" + alias, alias)]
    for answer in answers:
        answer.pop("id", None)
        answer.pop("created", None)
    assert answers[0] == answers[1]
    assert httpx.request(method, server.url + alias, json=body).status_code == 401  # same auth


def test_new_routes_are_counted(server: ThreadedServer, oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    oai.responses.create(model="m", input="Hi")
    claude.messages.create(model="m", max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
    claude.messages.count_tokens(model="m", messages=[{"role": "user", "content": "Hi"}])
    httpx.post(server.url + "/chat/completions", headers=KEY, json={"messages": [{"role": "user", "content": "x"}]})
    metrics = httpx.get(server.url + "/metrics", headers=KEY).text
    for label in ("/v1/responses", "/v1/messages", "/v1/messages/count_tokens", "/chat/completions"):
        assert f'endpoint="{label}",status="200"' in metrics, label
    snapshot = server.context.stats.snapshot()  # what the ClearML reporter reads
    assert snapshot.requests_total >= 4
    assert snapshot.completion_tokens >= len("Hello from the fake engine.") + 8


def test_messages_output_config_format_sets_a_grammar(claude: anthropic.Anthropic, engine: FakeEngine) -> None:
    engine.replies.append('{"city": "Paris"}')
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    out = claude.messages.create(model="m", max_tokens=40, messages=[{"role": "user", "content": "x"}],
                                 output_config={"format": {"type": "json_schema", "schema": schema}})
    assert engine.requests[-1].sampling.grammar and "city" in engine.requests[-1].sampling.grammar
    assert json.loads(out.content[0].text) == {"city": "Paris"}  # type: ignore[union-attr]


def test_messages_unknown_fields_are_refused_and_routing_hints_ignored(server: ThreadedServer) -> None:
    base = {"max_tokens": 4, "messages": [{"role": "user", "content": "x"}]}
    h = {"x-api-key": API_KEY}
    r = httpx.post(server.url + "/v1/messages", headers=h, json={**base, "container": "c1"})
    assert r.status_code == 400 and "container" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/messages", headers=h,
                   json={**base, "cache_control": {"type": "ephemeral"}, "metadata": {"user_id": "u"},
                         "temperature": 0.5, "top_k": 5})
    assert r.status_code == 200, r.text
