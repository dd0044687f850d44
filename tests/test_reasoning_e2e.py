"""Reasoning and template options end to end: the demo model with DeepSeek-R1-Distill's released template,
whose generation prompt opens a <think> span when `chat_template_kwargs.enable_thinking` is true. Each fixture
template also renders a whole tool conversation through the app's own ChatTemplate."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from app.engine.chat import ChatTemplate, template_message
from app.engine.toolcalls import detect_format
from tests.conftest import API_KEY, REPO, AppProcess

TEMPLATES = REPO / "tests" / "fixtures" / "templates"
R1 = TEMPLATES / "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja"
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}
CONVERSATION = [
    {"role": "system", "content": "You call tools."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "abcDEF123", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "abcDEF123", "content": "18 C"},
]


TOOL_TEMPLATES = [p for p in sorted(TEMPLATES.glob("*.jinja")) if detect_format(p.read_text()).supports_tools]


def test_the_tool_families_are_all_represented() -> None:
    assert {detect_format(p.read_text()).name for p in TOOL_TEMPLATES} >= {"hermes", "llama3", "mistral",
                                                                           "deepseek_r1", "gpt_oss"}


@pytest.mark.parametrize("path", TOOL_TEMPLATES, ids=lambda p: p.stem)
def test_each_released_template_renders_a_tool_conversation(path: Path) -> None:
    template = ChatTemplate("model", path.read_text(), [], "<s>", "</s>")
    messages = [template_message(m) for m in CONVERSATION]
    try:
        text = template.render(messages, add_generation_prompt=True, tools=[TOOL])
    except Exception as exc:  # a template may refuse a message shape it was not trained on: say which
        pytest.fail(f"{path.name}: {exc}")
    assert "Paris" in text and "18 C" in text


def test_template_kwargs_reach_the_template() -> None:
    template = ChatTemplate("model", (TEMPLATES / "Qwen-Qwen3-0.6B.jinja").read_text(), [], "", "")
    messages = [{"role": "user", "content": "Hi"}]
    off = template.render(messages, kwargs={"enable_thinking": False})
    on = template.render(messages, kwargs={"enable_thinking": True})
    assert off.endswith("<think>\n\n</think>\n\n") and not on.endswith("</think>\n\n")


@pytest.fixture(scope="module")
def r1_app(demo_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppProcess]:
    model = tmp_path_factory.mktemp("r1-model") / "gemma-with-r1-template.gguf"
    subprocess.run([str(Path(sys.executable).parent / "gguf-new-metadata"), "--chat-template-file", str(R1),
                    demo_model, str(model)], check=True, capture_output=True, timeout=300, input=b"y\n")
    app = AppProcess(["--offline", "--model", str(model), "--port", "0", "--api-key", API_KEY, "--parallel", "2",
                      "--n-ctx", "2048", "--idle-time-limit-hours", "0"],
                     env={"CLEARML_CACHE_DIR": str(tmp_path_factory.mktemp("r1-app"))})
    app.start().wait_ready()
    yield app
    app.stop()


def test_thinking_on_goes_to_reasoning_content_streamed_or_not(r1_app: AppProcess) -> None:
    client = openai.OpenAI(base_url=r1_app.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    ask = [{"role": "user", "content": "Is 17 prime?"}]
    thinking = client.chat.completions.create(model="m", messages=ask, temperature=0, max_tokens=24,  # type: ignore[arg-type]
                                              extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    message = thinking.choices[0].message
    reasoning = getattr(message, "reasoning_content", None)
    assert reasoning  # the prompt opened <think>: the base model never closes it, so it is all reasoning
    assert not message.content and "<think>" not in reasoning
    streamed = ""
    for chunk in client.chat.completions.create(model="m", messages=ask, temperature=0, max_tokens=24, stream=True,  # type: ignore[call-overload]
                                                extra_body={"chat_template_kwargs": {"enable_thinking": True}}):
        for c in chunk.choices:
            assert not c.delta.content
            streamed += (c.delta.model_extra or {}).get("reasoning_content") or ""
    assert streamed == reasoning
    # Without the option the template closes the span itself: the reply is not forced into reasoning.
    plain = client.chat.completions.create(model="m", messages=ask, temperature=0, max_tokens=8)  # type: ignore[arg-type]
    body = json.loads(plain.model_dump_json())["choices"][0]["message"]
    assert (body.get("content") or "") + (body.get("reasoning_content") or "") != reasoning
