"""Tool calling end to end: the demo model with a real released chat template (Qwen 2.5's, Hermes-style
<tool_call> syntax) written into a copy of its GGUF, served by the real app, driven by the official openai client.

A 270M base model does not choose tools by itself; a forced tool_choice makes the grammar write the call, which
is exactly what makes even a small model produce a valid call.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import API_KEY, REPO, AppProcess

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
FORCED = {"type": "function", "function": {"name": "get_weather"}}
ASK = [{"role": "system", "content": "You call tools to answer."},
       {"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
def client(tool_app: AppProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=tool_app.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_the_template_family_is_detected(tool_app: AppProcess) -> None:
    assert "tool calls: hermes format" in tool_app.log


def test_a_forced_call_then_the_tools_result_then_an_answer(client: openai.OpenAI) -> None:
    # One call per turn: left free, a base model keeps calling until max_tokens (every call valid).
    first = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], tool_choice=FORCED,  # type: ignore[arg-type, list-item]
                                           temperature=0, max_tokens=60, parallel_tool_calls=False)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls and len(choice.message.tool_calls) >= 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    arguments = json.loads(call.function.arguments)  # the openai client's own parsing: valid JSON
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    assert "<tool_call>" not in (choice.message.content or "")
    history: list[Any] = [*ASK, choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 18})}]
    final = client.chat.completions.create(model="m", messages=history, tools=[WEATHER], tool_choice="none",
                                           temperature=0, max_tokens=16)
    assert final.choices[0].message.tool_calls is None
    assert isinstance(final.choices[0].message.content, str) and final.choices[0].message.content
    assert final.usage is not None and final.usage.prompt_tokens_details is not None
    assert final.usage.prompt_tokens_details.cached_tokens  # the growing conversation reused its prefix


def test_the_stream_joins_to_the_same_call(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(model="m", messages=ASK, tools=[WEATHER], tool_choice=FORCED, temperature=0,
                                  max_tokens=60, parallel_tool_calls=False)
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.message.tool_calls
    names, ids, arguments, reasons, content = [], [], "", [], ""
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            content += c.delta.content or ""
            reasons.append(c.finish_reason)
            for tc in c.delta.tool_calls or []:
                assert tc.index == 0
                if tc.id:
                    ids.append(tc.id)
                if tc.function and tc.function.name:
                    names.append(tc.function.name)
                arguments += (tc.function.arguments or "") if tc.function else ""
    assert names == ["get_weather"] and len(ids) == 1  # id and name once, then argument fragments
    assert json.loads(arguments) == json.loads(whole.message.tool_calls[0].function.arguments)
    assert "<tool_call" not in content and reasons[-1] == "tool_calls"


def test_tool_choice_none_is_plain_text(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], tool_choice="none",
                                         temperature=0, max_tokens=12)
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason in ("stop", "length")


def test_unknown_fields_are_refused_and_habitual_ones_accepted(tool_app: AppProcess) -> None:
    h = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(tool_app.url + "/v1/chat/completions", headers=h,
                   json={"messages": ASK, "max_tokens": 2, "prediction": {"type": "content", "content": "x"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prediction", r.text
    r = httpx.post(tool_app.url + "/v1/chat/completions", headers=h,
                   json={"messages": ASK, "max_tokens": 2, "user": "u1", "store": False, "metadata": {"k": "v"}})
    assert r.status_code == 200, r.text


def test_logit_bias_bans_a_token(client: openai.OpenAI, tool_app: AppProcess) -> None:
    messages = [{"role": "user", "content": "Say hello."}]
    first = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=1,  # type: ignore[arg-type]
                                           logprobs=True)
    assert first.choices[0].logprobs and first.choices[0].logprobs.content
    piece = first.choices[0].logprobs.content[0].token
    tokens = httpx.post(tool_app.url + "/tokenize", headers={"X-Api-Key": API_KEY},
                        json={"content": piece, "with_pieces": True}).json()["tokens"]
    banned = next(t["id"] for t in tokens if t["piece"] == piece)
    second = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=1,  # type: ignore[arg-type]
                                            logprobs=True, logit_bias={str(banned): -100})
    assert second.choices[0].logprobs and second.choices[0].logprobs.content
    assert second.choices[0].logprobs.content[0].token != piece


def test_tools_on_a_template_without_a_tool_syntax_are_refused(fake_server: Any) -> None:
    h = {"X-Api-Key": API_KEY}
    r = httpx.post(fake_server.url + "/v1/chat/completions", headers=h,
                   json={"messages": ASK, "tools": [WEATHER]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "tools_not_supported", r.text
    r = httpx.post(fake_server.url + "/v1/chat/completions", headers=h,
                   json={"messages": ASK, "tool_choice": "required"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    r = httpx.post(fake_server.url + "/v1/chat/completions", headers=h,
                   json={"messages": ASK, "tools": [WEATHER], "tool_choice": "none", "max_tokens": 3})
    assert r.status_code == 200  # tool_choice none: the tools are not used, so nothing to parse


def test_a_named_tool_choice_must_be_one_of_the_tools(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER],  # type: ignore[arg-type, list-item]
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert err.value.body["param"] == "tool_choice"  # type: ignore[index]


def test_the_readme_tools_example_runs(tool_app: AppProcess, capsys: pytest.CaptureFixture[str]) -> None:
    import re

    readme = (REPO / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "tools=[weather]" in b)
    code = block.replace("http://localhost:8080/v1", tool_app.url + "/v1").replace("<the logged key>", API_KEY)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.startswith("get_weather {'city': ")
