"""OpenAI Responses and Anthropic Messages on the real model (the demo model with Qwen 2.5's tool-calling
template, see conftest.tool_app), driven by the official `openai` and `anthropic` clients; the path aliases on
the plain demo app answer exactly like their /v1 routes."""

from __future__ import annotations

import json
import re
from typing import Any

import anthropic
import httpx
import jsonschema
import openai
import pytest

from tests.conftest import API_KEY, REPO, AppProcess

WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                  "required": ["city", "unit"]}
FLAT_TOOL = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
             "parameters": WEATHER_PARAMS}
CLAUDE_TOOL = {"name": "get_weather", "description": "Current weather in a city", "input_schema": WEATHER_PARAMS}
SYSTEM = "You call tools to answer."
QUESTION = "What is the weather in Paris?"
# Today's anthropic client has no sampling arguments (older ones send temperature, top_p, top_k; the server
# takes them): tests that compare two runs ask for greedy decoding in the body.
GREEDY = {"temperature": 0}


@pytest.fixture
def oai(tool_app: AppProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=tool_app.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture
def claude(tool_app: AppProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=tool_app.url, api_key=API_KEY, max_retries=0, timeout=120)


# --- OpenAI Responses ------------------------------------------------------------------------------------------

def test_responses_plain_and_streamed_agree(oai: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(model="m", instructions="Answer briefly.", input="Name a colour.",
                                  max_output_tokens=12, temperature=0)
    whole = oai.responses.create(**kwargs)
    assert whole.status in ("completed", "incomplete") and whole.output_text.strip()
    assert whole.usage is not None and whole.usage.input_tokens > 5 and 0 < whole.usage.output_tokens <= 12
    events = list(oai.responses.create(stream=True, **kwargs))
    assert events[0].type == "response.created" and events[-1].type in ("response.completed",
                                                                         "response.incomplete")
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
    assert streamed == whole.output_text
    final = events[-1].response  # type: ignore[union-attr]
    assert final.usage is not None and final.usage.input_tokens_details.cached_tokens > 0  # the prefix was reused


def test_responses_forced_function_call_round_trip(oai: openai.OpenAI) -> None:
    first = oai.responses.create(model="m", instructions=SYSTEM, input=QUESTION, tools=[FLAT_TOOL],  # type: ignore[list-item]
                                 tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False,
                                 temperature=0, max_output_tokens=60)
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls, first.output
    call = calls[0]
    assert call.name == "get_weather" and call.call_id
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMS)
    assert "<tool_call>" not in first.output_text
    second = oai.responses.create(model="m", instructions=SYSTEM, tools=[FLAT_TOOL], tool_choice="none",  # type: ignore[list-item]
                                  temperature=0, max_output_tokens=16, input=[
                                      {"role": "user", "content": QUESTION},
                                      {"type": "function_call", "call_id": call.call_id, "name": call.name,
                                       "arguments": call.arguments},
                                      {"type": "function_call_output", "call_id": call.call_id,
                                       "output": json.dumps({"temperature_c": 18})}])
    assert not [item for item in second.output if item.type == "function_call"]
    assert isinstance(second.output_text, str)
    assert second.usage is not None and second.usage.input_tokens_details.cached_tokens > 0


def test_responses_streamed_function_call_matches_the_whole_one(oai: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(model="m", instructions=SYSTEM, input=QUESTION, tools=[FLAT_TOOL],
                                  tool_choice="required", parallel_tool_calls=False, temperature=0,
                                  max_output_tokens=60)
    whole = [item for item in oai.responses.create(**kwargs).output if item.type == "function_call"]
    events = list(oai.responses.create(stream=True, **kwargs))
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")  # type: ignore[union-attr]
    assert whole and json.loads(arguments) == json.loads(whole[0].arguments)


def test_responses_text_format_json_schema(oai: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    out = oai.responses.create(model="m", input="Invent a person.", temperature=0, max_output_tokens=60,
                               text={"format": {"type": "json_schema", "name": "person", "schema": schema,
                                                "strict": True}})
    jsonschema.validate(json.loads(out.output_text), schema)


def test_responses_previous_response_id_is_refused(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        oai.responses.create(model="m", input="x", previous_response_id="resp_abc")
    assert err.value.body["param"] == "previous_response_id" and "stateless" in err.value.body["message"]  # type: ignore[index]


# --- Anthropic Messages ----------------------------------------------------------------------------------------

def test_messages_plain_and_streamed_agree(claude: anthropic.Anthropic) -> None:
    kwargs: dict[str, Any] = dict(model="m", max_tokens=12, extra_body=GREEDY, system="Answer briefly.",
                                  messages=[{"role": "user", "content": "Name a colour."}])
    whole = claude.messages.create(**kwargs)
    assert whole.stop_reason in ("end_turn", "max_tokens") and whole.content[0].type == "text"
    with claude.messages.stream(**kwargs) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == whole.content[0].text  # type: ignore[union-attr]
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.cache_read_input_tokens  # the prefix was reused


def test_messages_forced_tool_use_round_trip(claude: anthropic.Anthropic) -> None:
    first = claude.messages.create(model="m", max_tokens=60, extra_body=GREEDY, system=SYSTEM,
                                   tools=[CLAUDE_TOOL],  # type: ignore[list-item]
                                   tool_choice={"type": "tool", "name": "get_weather",
                                                "disable_parallel_tool_use": True},
                                   messages=[{"role": "user", "content": QUESTION}])
    assert first.stop_reason == "tool_use"
    uses = [b for b in first.content if b.type == "tool_use"]
    assert uses and uses[0].name == "get_weather"
    jsonschema.validate(uses[0].input, WEATHER_PARAMS)
    history: Any = [{"role": "user", "content": QUESTION},
                    {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,
                                                  "content": json.dumps({"temperature_c": 18})}]}]
    second = claude.messages.create(model="m", max_tokens=16, extra_body=GREEDY, system=SYSTEM, tools=[CLAUDE_TOOL],  # type: ignore[list-item]
                                    tool_choice={"type": "none"}, messages=history)
    assert second.stop_reason in ("end_turn", "max_tokens")
    assert all(b.type == "text" for b in second.content)


def test_messages_streamed_tool_use(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(model="m", max_tokens=60, extra_body=GREEDY, system=SYSTEM,
                                tools=[CLAUDE_TOOL], tool_choice={"type": "any", "disable_parallel_tool_use": True},  # type: ignore[list-item]
                                messages=[{"role": "user", "content": QUESTION}]) as stream:
        final = stream.get_final_message()
    uses = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use" and uses
    jsonschema.validate(uses[0].input, WEATHER_PARAMS)


def test_count_tokens_is_the_prompt_the_model_sees(claude: anthropic.Anthropic) -> None:
    messages: Any = [{"role": "user", "content": "Count me, please."}]
    counted = claude.messages.count_tokens(model="m", system="Be exact.", tools=[CLAUDE_TOOL],  # type: ignore[list-item]
                                           messages=messages)
    out = claude.messages.create(model="m", max_tokens=1, system="Be exact.", tools=[CLAUDE_TOOL],  # type: ignore[list-item]
                                 messages=messages)
    assert counted.input_tokens == out.usage.input_tokens + (out.usage.cache_read_input_tokens or 0)
    assert counted.input_tokens > 100  # the tools are part of the rendered prompt


def test_new_routes_in_metrics(tool_app: AppProcess, oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    oai.responses.create(model="m", input="Hi", max_output_tokens=2)
    claude.messages.create(model="m", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    metrics = httpx.get(tool_app.url + "/metrics", headers={"X-Api-Key": API_KEY}).text
    assert 'llamacpp_requests_total{endpoint="/v1/responses",status="200"}' in metrics
    assert 'llamacpp_requests_total{endpoint="/v1/messages",status="200"}' in metrics


# --- path aliases -----------------------------------------------------------------------------------------------

def test_aliases_give_the_same_body_for_the_same_seed(real_app: AppProcess) -> None:
    key = {"Authorization": f"Bearer {API_KEY}"}
    chat = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 12, "temperature": 0.9,
            "seed": 1234}
    text = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0.9, "seed": 99}
    for path, body in (("/chat/completions", chat), ("/completions", text), ("/embeddings", {"input": "abc"}),
                       ("/models", None)):
        method = "GET" if body is None else "POST"
        answers = [httpx.request(method, real_app.url + p, headers=key, json=body, timeout=120).json()
                   for p in ("/v1" + path, path)]
        for answer in answers:
            answer.pop("id", None)
            answer.pop("created", None)
            if isinstance(answer.get("usage"), dict):
                answer["usage"].pop("prompt_tokens_details", None)  # the second call reuses the first's prefix
        assert answers[0] == answers[1], path


@pytest.mark.parametrize(("marker", "expected"), [
    ("client.responses.create", [("responses: get_weather {",), ("completed", "incomplete")]),
    ("anthropic.Anthropic", [("messages: tool_use get_weather {'city': ",), ("prompt tokens: ",),
                             ("end_turn", "max_tokens")]),
])
def test_the_readme_examples_run(tool_app: AppProcess, capsys: pytest.CaptureFixture[str], marker: str,
                                 expected: list[tuple[str, ...]]) -> None:
    readme = (REPO / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if marker in b)
    code = (block.replace("http://localhost:8080/v1", tool_app.url + "/v1")
            .replace("http://localhost:8080", tool_app.url).replace("<the logged key>", API_KEY))
    exec(compile(code, "README.md", "exec"), {})
    # print() ends lines with "\n" only; a sampled city name may hold U+2028 or U+0085, which splitlines() splits on.
    lines = capsys.readouterr().out.removesuffix("\n").split("\n")
    assert len(lines) == len(expected), lines
    for line, starts in zip(lines, expected, strict=True):
        assert line.startswith(starts), (line, starts)


def test_cors_on_the_real_app(tool_app: AppProcess) -> None:
    origin = {"Origin": "https://chat.example.org"}
    preflight = httpx.options(tool_app.url + "/v1/responses", headers={
        **origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "*"
    keyless = httpx.post(tool_app.url + "/v1/messages", headers=origin,
                         json={"max_tokens": 2, "messages": [{"role": "user", "content": "x"}]})
    assert keyless.status_code == 401 and keyless.headers["access-control-allow-origin"] == "*"
    assert keyless.json()["error"]["type"] == "authentication_error"
