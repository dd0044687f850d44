"""Tool-call and reasoning parsing per template family, streamed at every split, and forced-call grammars.

The templates under tests/fixtures/templates are llama.cpp's copies of released models' templates
(see SOURCE.md); the canned outputs are written the way those models write.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import json
import math
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jinja2
import llama_cpp
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from app.engine.reasoning import prompt_opens_reasoning
from app.engine.toolcalls import (
    ChatFormat,
    ParsedOutput,
    StreamEvent,
    StreamParser,
    collect,
    detect_format,
    forced_call_grammar,
    format_named,
    parse_output,
)
from app.engine.types import InvalidRequestError
from app.model_source import demo_model_path

TEMPLATES = Path(__file__).parent / "fixtures" / "templates"

HERMES = format_named("hermes")
QWEN25 = dataclasses.replace(HERMES, reasoning=False)
LLAMA3 = format_named("llama3")
MISTRAL = format_named("mistral")
R1 = format_named("deepseek_r1")
V31 = dataclasses.replace(R1, variant="v3.1")
GPT_OSS = format_named("gpt_oss")
PLAIN = format_named("plain")
PLAIN_THINK = dataclasses.replace(PLAIN, reasoning=True)


def fmt_id(fmt: ChatFormat) -> str:
    return f"{fmt.name}-{fmt.variant or 'default'}{'-think' if fmt.reasoning else ''}"

# ---------------------------------------------------------------------------------------------
# Detection

EXPECTED_FORMATS = {
    "Qwen-Qwen2.5-7B-Instruct": ("hermes", False, ""),
    "Qwen-Qwen3-0.6B": ("hermes", True, ""),
    "Qwen-QwQ-32B": ("hermes", True, ""),
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": ("hermes", False, ""),
    "meta-llama-Llama-3.1-8B-Instruct": ("llama3", False, ""),
    "meta-llama-Llama-3.2-3B-Instruct": ("llama3", False, ""),
    "mistralai-Mistral-Nemo-Instruct-2407": ("mistral", False, "json"),
    "Mistral-Small-3.2-24B-Instruct-2506": ("mistral", False, "call_id"),
    "unsloth-mistral-Devstral-Small-2507": ("mistral", False, "args"),
    "mistralai-Ministral-3-14B-Reasoning-2512": ("mistral", True, "args"),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": ("deepseek_r1", True, "r1"),
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B": ("deepseek_r1", True, "r1"),
    "deepseek-ai-DeepSeek-V3.1": ("deepseek_r1", True, "v3.1"),
    "openai-gpt-oss-120b": ("gpt_oss", True, ""),
    "Qwen3-Coder": ("plain", False, ""),
    "meetkai-functionary-medium-v3.1": ("plain", False, ""),
    "google-gemma-2-2b-it": ("plain", False, ""),
}


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


def test_every_fixture_has_an_expected_family() -> None:
    assert sorted(p.stem for p in TEMPLATES.glob("*.jinja")) == sorted(EXPECTED_FORMATS)


@pytest.mark.parametrize("name", sorted(EXPECTED_FORMATS))
def test_detect_format_on_real_templates(name: str) -> None:
    fmt = detect_format(template(name))
    family, reasoning, variant = EXPECTED_FORMATS[name]
    assert (fmt.name, fmt.reasoning, fmt.variant if family != "hermes" else "") == (family, reasoning, variant)
    assert fmt.supports_tools == (family != "plain")


def test_detect_format_without_a_template_is_plain() -> None:
    assert detect_format(None) == PLAIN
    assert detect_format("") == PLAIN


def test_format_named() -> None:
    assert format_named("llama3").name == "llama3"
    assert not format_named("plain").supports_tools
    with pytest.raises(ValueError, match="unknown tool-call format"):
        format_named("chatml")


# ---------------------------------------------------------------------------------------------
# Canned outputs

Call = tuple[str, dict[str, Any], str | None]  # name, arguments, the model's own id (None: generated)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    fmt: ChatFormat
    text: str
    content: str
    reasoning: str | None = None
    calls: tuple[Call, ...] = ()
    options: tuple[tuple[str, bool], ...] = ()


WEATHER_JSON = '{"name": "get_weather", "arguments": {"location": "Paris, France", "unit": "celsius"}}'
WEATHER = ("get_weather", {"location": "Paris, France", "unit": "celsius"}, None)
TIME = ("get_time", {"timezone": "Europe/Paris"}, None)
OPENS = (("prompt_opens_reasoning", True),)

CASES = [
    # Hermes 2 Pro / Qwen 2.5 / Qwen 3 / QwQ
    Case("hermes-call", QWEN25, f"<tool_call>\n{WEATHER_JSON}\n</tool_call>", "", calls=(WEATHER,)),
    Case("hermes-parallel", HERMES,
         f'<tool_call>\n{WEATHER_JSON}\n</tool_call>\n<tool_call>\n'
         '{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>', "", calls=(WEATHER, TIME)),
    Case("hermes-content-then-call", QWEN25,
         f"I'll check the weather for you.\n<tool_call>\n{WEATHER_JSON}\n</tool_call>",
         "I'll check the weather for you.", calls=(WEATHER,)),
    Case("qwen3-reasoning-then-call", HERMES,
         "<think>\nThe user wants the weather in Paris. I should call get_weather with celsius.\n</think>\n\n"
         f"<tool_call>\n{WEATHER_JSON}\n</tool_call>",
         "", "The user wants the weather in Paris. I should call get_weather with celsius.", (WEATHER,)),
    Case("qwen3-reasoning-then-answer", HERMES,
         "<think>\nSimple arithmetic: 2 + 2 = 4.\n</think>\n\nThe answer is **4**.",
         "The answer is **4**.", "Simple arithmetic: 2 + 2 = 4."),
    Case("qwq-prompt-opened-think", HERMES,
         "Compare a < b and a <= b; </thin is not the end.\n</think>\n\nBoth hold when a < b.",
         "Both hold when a < b.", "Compare a < b and a <= b; </thin is not the end.", options=OPENS),
    Case("qwq-unfinished-thought", HERMES, "Let me count the letters: s, t, r", "",
         "Let me count the letters: s, t, r", options=OPENS),
    Case("hermes-malformed-json", QWEN25,
         'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}\n</tool_call>',
         'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}\n</tool_call>'),
    Case("hermes-no-call", QWEN25, "Paris is the capital of France.\n", "Paris is the capital of France."),
    Case("hermes-markers-in-prose", QWEN25, "Tags look like <tool and <tool_c or <think> in text <",
         "Tags look like <tool and <tool_c or <think> in text <"),
    Case("hermes-unicode-and-string-arguments", QWEN25,
         '<tool_call>\n{"name": "translate", "arguments": '
         '"{\\"text\\": \\"naïve café — “ok”\\", \\"to\\": \\"日本語\\"}"}\n</tool_call>',
         "", calls=(("translate", {"text": "naïve café — “ok”", "to": "日本語"}, None),)),
    Case("hermes-unterminated-call", QWEN25, f"<tool_call>\n{WEATHER_JSON}\n", "", calls=(WEATHER,)),
    Case("hermes-unterminated-garbage", QWEN25, '<tool_call>\n{"name": "get_weath',
         '<tool_call>\n{"name": "get_weath'),
    Case("hermes-no-arguments", QWEN25, '<tool_call>\n{"name": "get_time"}\n</tool_call>', "",
         calls=(("get_time", {}, None),)),
    Case("hermes-nested-tag-retry", QWEN25, f"<tool_call><tool_call>\n{WEATHER_JSON}\n</tool_call>",
         "<tool_call>", calls=(WEATHER,)),
    Case("hermes-content-between-calls", QWEN25,
         f"First: <tool_call>{WEATHER_JSON}</tool_call> then done.", "First:then done.", calls=(WEATHER,)),
    # Llama 3.1 / 3.2 / 3.3
    Case("llama3-json-call", LLAMA3,
         '{"name": "get_weather", "parameters": {"location": "Paris, France", "unit": "celsius"}}',
         "", calls=(WEATHER,)),
    Case("llama3-typed-call", LLAMA3,
         '\n{"type": "function", "name": "get_time", "parameters": {"timezone": "Europe/Paris"}}', "",
         calls=(TIME,)),
    Case("llama3-two-calls", LLAMA3,
         '{"name": "get_weather", "parameters": {"location": "Paris, France", "unit": "celsius"}}; '
         '{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}', "", calls=(WEATHER, TIME)),
    Case("llama3-python-tag-builtin", LLAMA3,
         '<|python_tag|>brave_search.call(query="current weather in Menlo Park, California")<|eom_id|>', "",
         calls=(("brave_search", {"query": "current weather in Menlo Park, California"}, None),)),
    Case("llama3-python-tag-json", LLAMA3,
         '<|python_tag|>{"name": "get_weather", "parameters": {"location": "Paris, France", "unit": "celsius"}}',
         "", calls=(WEATHER,)),
    Case("llama3-json-answer-is-content", LLAMA3, '{"answer": 42, "unit": "none"}',
         '{"answer": 42, "unit": "none"}'),
    Case("llama3-json-after-prose-is-content", LLAMA3,
         'Here you go: {"name": "get_time", "parameters": {}}', 'Here you go: {"name": "get_time", "parameters": {}}'),
    Case("llama3-malformed-call", LLAMA3, '{"name": "get_weather", "parameters": {"location": }}',
         '{"name": "get_weather", "parameters": {"location": }}'),
    Case("llama3-python-code-is-content", LLAMA3, "<|python_tag|>print(1 + 1)", "<|python_tag|>print(1 + 1)"),
    Case("llama3-no-call", LLAMA3, "The weather in Paris is mild today.", "The weather in Paris is mild today."),
    # Mistral Nemo / Small 3.2 / Devstral / Ministral reasoning
    Case("mistral-nemo-parallel", MISTRAL,
         '[TOOL_CALLS][{"name": "get_weather", "arguments": {"location": "Paris, France", "unit": "celsius"}, '
         '"id": "a1B2c3D4e"}, {"name": "get_time", "arguments": {"timezone": "Europe/Paris"}, "id": "Z9y8X7w6V"}]',
         "", calls=(WEATHER[:2] + ("a1B2c3D4e",), TIME[:2] + ("Z9y8X7w6V",))),
    Case("mistral-small-call-id", MISTRAL,
         '[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{"location": "Paris, France", "unit": "celsius"}', "",
         calls=(WEATHER[:2] + ("a1B2c3D4e",),)),
    Case("devstral-content-and-two-calls", MISTRAL,
         "I'll check both.[TOOL_CALLS]get_weather[ARGS]{\"location\": \"Paris, France\", \"unit\": \"celsius\"}"
         '[TOOL_CALLS]get_time[ARGS]{"timezone": "Europe/Paris"}', "I'll check both.", calls=(WEATHER, TIME)),
    Case("ministral-reasoning", MISTRAL, "[THINK]The user greets me. Reply briefly.[/THINK]Hello! How can I help?",
         "Hello! How can I help?", "The user greets me. Reply briefly."),
    Case("mistral-bad-name", MISTRAL, "[TOOL_CALLS]get weather[ARGS]{}", "[TOOL_CALLS]get weather[ARGS]{}"),
    Case("mistral-unclosed-arguments", MISTRAL, '[TOOL_CALLS]get_time[ARGS]{"timezone": "Europe/Par',
         '[TOOL_CALLS]get_time[ARGS]{"timezone": "Europe/Par'),
    Case("mistral-no-call", MISTRAL, "Bonjour ! [TOOL] is not a marker.", "Bonjour ! [TOOL] is not a marker."),
    # DeepSeek R1 (Distill) and V3.1
    Case("r1-reasoning-then-calls", R1,
         "Okay, the user wants weather and time.\n</think>\n\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function"
         '<｜tool▁sep｜>get_weather\n```json\n{"location": "Paris, France", "unit": "celsius"}\n```'
         "<｜tool▁call▁end｜>\n"
         '<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{"timezone": "Europe/Paris"}\n```'
         "<｜tool▁call▁end｜><｜tool▁calls▁end｜>", "", "Okay, the user wants weather and time.", (WEATHER, TIME),
         OPENS),
    Case("r1-reopened-think", R1, "<think>\nHmm, 17 is prime.\n</think>\n\nYes, 17 is prime.",
         "Yes, 17 is prime.", "Hmm, 17 is prime.", options=OPENS),
    Case("r1-no-prompt-think", R1, "<think>\nQuick.\n</think>\nDone.", "Done.", "Quick."),
    Case("r1-reasoning-off", R1, "Hmm.\n</think>\n\nDone.", "Hmm.\n</think>\n\nDone.",
         options=OPENS + (("reasoning", False),)),
    Case("deepseek-v31-call", V31,
         '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"location": "Paris, France", '
         '"unit": "celsius"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>', "", calls=(WEATHER,)),
    Case("r1-malformed-call", R1,
         "Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather\n{oops}<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
         "Sure.<｜tool▁call▁begin｜>get_weather\n{oops}<｜tool▁call▁end｜>"),
    # gpt-oss (harmony)
    Case("gpt-oss-analysis-final", GPT_OSS,
         "<|channel|>analysis<|message|>User says hi. Respond politely.<|end|><|start|>assistant<|channel|>final"
         "<|message|>Hello! How can I help you today?", "Hello! How can I help you today?",
         "User says hi. Respond politely."),
    Case("gpt-oss-call-in-channel-header", GPT_OSS,
         "<|channel|>analysis<|message|>Need the weather tool.<|end|><|start|>assistant<|channel|>commentary "
         'to=functions.get_weather <|constrain|>json<|message|>{"location":"Paris, France","unit":"celsius"}<|call|>',
         "", "Need the weather tool.", (WEATHER,)),
    Case("gpt-oss-call-in-role-header", GPT_OSS,
         "<|channel|>analysis<|message|>Time lookup.<|end|><|start|>assistant to=functions.get_time<|channel|>"
         'commentary json<|message|>{"timezone": "Europe/Paris"}', "", "Time lookup.", (TIME,)),
    Case("gpt-oss-preamble-then-call", GPT_OSS,
         "<|channel|>commentary<|message|>Checking the forecast.<|end|><|start|>assistant<|channel|>commentary "
         'to=functions.get_weather <|constrain|>json<|message|>{"location": "Paris, France", "unit": "celsius"}',
         "Checking the forecast.", calls=(WEATHER,)),
    Case("gpt-oss-malformed-arguments", GPT_OSS,
         "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{location: Paris}<|call|>",
         "{location: Paris}"),
    Case("gpt-oss-no-harmony", GPT_OSS, "Just text, no channels.", "Just text, no channels."),
    Case("gpt-oss-reasoning-off", GPT_OSS,
         "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>Hi.",
         "<|channel|>analysis<|message|>Think.<|end|>Hi.", options=(("reasoning", False),)),
    # Plain
    Case("plain-verbatim", PLAIN, '  <tool_call>{"name": "x"}</tool_call>\n',
         '  <tool_call>{"name": "x"}</tool_call>\n'),
    Case("plain-with-think", PLAIN_THINK, "<think>\nok\n</think>\n\nSure.", "Sure.", "ok"),
]


def generated_id(fmt: ChatFormat, call_id: str) -> bool:
    pattern = r"[A-Za-z0-9]{9}" if fmt.name == "mistral" else r"call_[A-Za-z0-9]{24}"
    return re.fullmatch(pattern, call_id) is not None


def check(case: Case, parsed: ParsedOutput) -> None:
    assert parsed.content == case.content
    assert parsed.reasoning == case.reasoning
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [(n, a) for n, a, _ in case.calls]
    for call, (_, arguments, call_id) in zip(parsed.tool_calls, case.calls, strict=True):
        assert call.arguments == json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))
        assert call.id == call_id if call_id else generated_id(case.fmt, call.id)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_parse_output(case: Case) -> None:
    check(case, parse_output(case.fmt, case.text, **dict(case.options)))


def stream(case: Case, pieces: list[str]) -> list[StreamEvent]:
    parser = StreamParser(case.fmt, **dict(case.options))
    events = [event for piece in pieces for event in parser.feed(piece)]
    return events + parser.finish()


def check_events(events: list[StreamEvent]) -> None:
    started: list[int] = []
    for event in events:
        if event.kind == "tool_call_start":
            assert event.index == len(started) and event.id and event.name
            started.append(event.index)
        elif event.kind == "tool_call_arguments":
            assert event.index in started
        else:
            assert event.text


def random_pieces(text: str, rng: random.Random) -> list[str]:
    """Token-like pieces: mostly short, sometimes one character."""
    pieces, at = [], 0
    while at < len(text):
        size = rng.choice((1, 1, 2, 3, 4, 5, 8))
        pieces.append(text[at:at + size])
        at += size
    return pieces


def splits(text: str, seed: int) -> Iterator[list[str]]:
    """One character at a time, in two at every boundary, and twenty token-like splits."""
    yield list(text)
    for at in range(len(text) + 1):
        yield [text[:at], text[at:]]
    rng = random.Random(seed)
    for _ in range(20):
        yield random_pieces(text, rng)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_stream_equals_whole_at_every_split(case: Case) -> None:
    whole = parse_output(case.fmt, case.text, **dict(case.options))
    for n, pieces in enumerate(splits(case.text, seed=len(case.text))):
        events = stream(case, pieces)
        check_events(events)
        joined = collect(events)
        assert (joined.content, joined.reasoning) == (whole.content, whole.reasoning), pieces
        assert [(c.name, c.arguments) for c in joined.tool_calls] == \
               [(c.name, c.arguments) for c in whole.tool_calls], pieces
        check(case, joined)
        assert n < 5 or events  # every split produced something (cheap sanity)


def test_content_streams_before_the_call_and_partial_markers_are_held() -> None:
    parser = StreamParser(QWEN25)
    assert collect(parser.feed("I'll check ")).content == "I'll check"  # the space may still precede markup
    assert collect(parser.feed("that. <tool_")).content == " that."
    assert parser.feed('call>\n{"name": "get_time", "arguments": {}}') == []
    events = parser.feed("\n</tool_call>")
    assert [e.kind for e in events] == ["tool_call_start", "tool_call_arguments"]
    assert (events[0].name, events[1].text) == ("get_time", "{}")
    assert parser.finish() == []


def test_reasoning_streams_as_it_comes() -> None:
    parser = StreamParser(R1, prompt_opens_reasoning=True)
    assert collect(parser.feed("First, ")).reasoning == "First,"
    assert collect(parser.feed("recall </th")).reasoning == " recall"
    out = collect(parser.feed("ink>\n\nAnswer") + parser.finish())
    assert (out.reasoning, out.content) == (None, "Answer")


def test_feed_after_finish_is_refused() -> None:
    parser = StreamParser(HERMES)
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")


def test_tools_off_keeps_reasoning_and_leaves_call_markup() -> None:
    fmt = dataclasses.replace(HERMES, supports_tools=False)
    out = parse_output(fmt, f"<think>ok</think><tool_call>{WEATHER_JSON}</tool_call>")
    assert (out.reasoning, out.content, out.tool_calls) == ("ok", f"<tool_call>{WEATHER_JSON}</tool_call>", [])


def test_lone_surrogate_escapes_stay_encodable() -> None:
    out = parse_output(QWEN25, '<tool_call>{"name": "echo", "arguments": {"text": "\\ud800x"}}</tool_call>')
    assert out.tool_calls[0].arguments == '{"text":"\\ud800x"}'
    out.tool_calls[0].arguments.encode("utf-8")


def test_deeply_nested_arguments_do_not_crash() -> None:
    text = "<tool_call>" + '{"name": "x", "arguments": ' + "[" * 100_000 + "]" * 100_000 + "}</tool_call>"
    out = parse_output(QWEN25, text)
    assert out.tool_calls == [] and out.content.startswith("<tool_call>")


FUZZ_PIECES = {
    HERMES: ["<tool_call>", "</tool_call>", "<think>", "</think>", WEATHER_JSON, '{"name": "g"}', "{", "}", '"',
             "\\", " ", "\n", "x", "<", "<tool_", "</th", ";"],
    LLAMA3: ["<|python_tag|>", "<|eom_id|>", '{"name": "f", "parameters": {"a": 1}}', '{"type": "function", ',
             '"name"', ":", "{", "}", ";", " ", "\n", "x", '"', 'f.call(q="1")', "<|"],
    MISTRAL: ["[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "a1B2c3D4e", "f", "n" * 120, '{"a": 1}',
              '[{"name": "f", "arguments": {}}]', "[THINK]", "[/THINK]", "{", "}", "[", "]", " ", "\n", "x"],
    R1: ["<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>",
         "<｜tool▁calls▁end｜>", "function", "f\n", "```json\n", '{"a": 1}', "\n```", "<think>", "</think>",
         " ", "\n", "x", "<｜"],
    GPT_OSS: ["<|channel|>", "analysis", "final", "commentary", " to=functions.f", " to=assistant", "<|constrain|>json",
              "<|message|>", "<|end|>", "<|call|>", "<|start|>assistant", '{"a": 1}', "x", " ", "\n", "<|", "{"],
}


@pytest.mark.parametrize("fmt", list(FUZZ_PIECES), ids=fmt_id)
def test_stream_equals_whole_on_random_markup(fmt: ChatFormat) -> None:
    """Random strings of the family's marker fragments (a campaign of 40,000 found no difference)."""
    rng = random.Random(fmt.name)
    for _ in range(150):
        text = "".join(rng.choice(FUZZ_PIECES[fmt]) for _ in range(rng.randint(0, 20)))
        options = rng.choice([{}, {"prompt_opens_reasoning": True}, {"reasoning": False}])
        whole = parse_output(fmt, text, **options)
        for pieces in (list(text), random_pieces(text, rng), random_pieces(text, rng)):
            parser = StreamParser(fmt, **options)
            joined = collect([e for p in pieces for e in parser.feed(p)] + parser.finish())
            assert (joined.content, joined.reasoning, [(c.name, c.arguments) for c in joined.tool_calls]) == \
                   (whole.content, whole.reasoning, [(c.name, c.arguments) for c in whole.tool_calls]), text


# ---------------------------------------------------------------------------------------------
# Forced-call grammars, compiled and run by llama.cpp on the demo model's vocabulary

def tool(name: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name, "description": f"{name} tool"}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


TOOLS = [
    tool("get_weather", {"type": "object", "properties": {
        "location": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["location", "unit"]}),
    # Two tools whose $defs share a name but differ: their rules must not collide.
    tool("place_order", {"type": "object",
                         "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Item"}}},
                         "required": ["items"], "$defs": {"Item": {"type": "object", "properties": {
                             "sku": {"type": "string"}, "qty": {"type": "integer"}}, "required": ["sku", "qty"]}}}),
    tool("watch", {"type": "object", "properties": {"item": {"$ref": "#/$defs/Item"}}, "required": ["item"],
                   "$defs": {"Item": {"type": "object", "properties": {"ticker": {"type": "string"}},
                                      "required": ["ticker"]}}}),
    tool("get_time"),
]
WEATHER_ARGS = '{"location": "Paris", "unit": "celsius"}'
ORDER_ARGS = '{"items": [{"sku": "A-1", "qty": 2}]}'
WATCH_ARGS = '{"item": {"ticker": "ACME"}}'


def sample(fmt: ChatFormat, calls: list[tuple[str, str]]) -> str:
    """Calls written the way the family's grammar writes them."""
    if fmt.name in ("hermes", "llama3") or (fmt.name == "mistral" and fmt.variant == "json"):
        key = "parameters" if fmt.name == "llama3" else "arguments"
        objects = [f'{{"name": "{n}", "{key}": {a}}}' for n, a in calls]
        if fmt.name == "hermes":
            return "\n".join(f"<tool_call>\n{o}\n</tool_call>" for o in objects)
        return objects[0] if fmt.name == "llama3" else "[TOOL_CALLS][" + ", ".join(objects) + "]"
    if fmt.name == "mistral":
        call_id = "[CALL_ID]a1B2c3D4e" if fmt.variant == "call_id" else ""
        return "".join(f"[TOOL_CALLS]{n}{call_id}[ARGS]{a}" for n, a in calls)
    if fmt.name == "deepseek_r1":
        if fmt.variant == "r1":
            one = [f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>{n}\n```json\n{a}\n```<｜tool▁call▁end｜>"
                   for n, a in calls]
            return "<｜tool▁calls▁begin｜>" + "\n".join(one) + "<｜tool▁calls▁end｜>"
        one = [f"<｜tool▁call▁begin｜>{n}<｜tool▁sep｜>{a}<｜tool▁call▁end｜>" for n, a in calls]
        return "<｜tool▁calls▁begin｜>" + "".join(one) + "<｜tool▁calls▁end｜>"
    n, a = calls[0]
    return f"<|channel|>commentary to=functions.{n} <|constrain|>json<|message|>{a}"


FAMILY_FORMATS = sorted({detect_format(template(name)) for name in EXPECTED_FORMATS
                         if EXPECTED_FORMATS[name][0] != "plain"}, key=lambda f: (f.name, f.variant, f.reasoning))


@dataclasses.dataclass
class Vocab:
    ptr: Any
    byte_tokens: dict[int, int]  # a token whose piece is exactly that byte

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.ptr, token, buf, len(buf), 0, True)
        return buf.raw[:n]

    def tokens(self, text: str) -> list[int]:
        """The tokenizer's tokens when their pieces spell `text`; else one byte token per byte.

        Gemma's pieces turn SentencePiece's "▁" into a space, so DeepSeek's markers need bytes.
        """
        data = text.encode()
        buf = (llama_cpp.llama_token * (len(data) + 8))()
        n = llama_cpp.llama_tokenize(self.ptr, data, len(data), buf, len(buf), False, False)
        tokens = list(buf[:max(n, 0)])
        if n >= 0 and b"".join(map(self.piece, tokens)) == data:
            return tokens
        return [self.byte_tokens[b] for b in data]


@pytest.fixture(scope="module")
def vocab() -> Iterator[Vocab]:
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(demo_model_path().encode(), params)
    assert model
    try:
        ptr = llama_cpp.llama_model_get_vocab(model)
        vocab = Vocab(ptr, {})
        for token in range(llama_cpp.llama_vocab_n_tokens(ptr)):
            piece = vocab.piece(token)
            if len(piece) == 1 and not llama_cpp.llama_vocab_is_eog(ptr, token):
                vocab.byte_tokens.setdefault(piece[0], token)
        assert len(vocab.byte_tokens) == 256
        yield vocab
    finally:
        llama_cpp.llama_model_free(model)


def accepts(vocab: Vocab, gbnf: str, text: str) -> bool:
    """Whether the grammar lets the model write exactly `text` and then stop.

    Each token is offered alone to the grammar sampler (`apply` sets a refused token's logit to
    -inf) and accepted only when allowed, so llama.cpp never sees a token it would abort on.
    """
    sampler = llama_cpp.llama_sampler_init_grammar(vocab.ptr, gbnf.encode(), b"root")
    assert sampler, "llama.cpp did not compile the grammar"
    eos = llama_cpp.llama_vocab_eos(vocab.ptr)
    try:
        for token in [*vocab.tokens(text), eos]:
            data = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 0.0, 0.0))
            candidates = llama_cpp.llama_token_data_array(data, 1, -1, False)
            llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
            if math.isinf(data[0].logit):
                return False
            if token != eos:
                llama_cpp.llama_sampler_accept(sampler, token)
        return True
    finally:
        llama_cpp.llama_sampler_free(sampler)


@pytest.mark.parametrize("fmt", FAMILY_FORMATS, ids=fmt_id)
def test_forced_grammar_compiles_accepts_its_calls_and_they_parse(vocab: Vocab, fmt: ChatFormat) -> None:
    gbnf = forced_call_grammar(fmt, TOOLS, None)
    several = [("place_order", ORDER_ARGS), ("watch", WATCH_ARGS), ("get_time", "{}")]
    for calls in ([("get_weather", WEATHER_ARGS)], several):
        if len(calls) > 1 and not fmt.parallel_calls:
            continue
        text = sample(fmt, calls)
        assert accepts(vocab, gbnf, text), text
        parsed = parse_output(fmt, text)
        assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == \
               [(n, json.loads(a)) for n, a in calls]
        assert parsed.content == ""
    # Arguments outside the schema, an unknown tool, or no call at all are refused.
    assert not accepts(vocab, gbnf, sample(fmt, [("get_weather", '{"location": "Paris", "unit": "kelvin"}')]))
    assert not accepts(vocab, gbnf, sample(fmt, [("watch", '{"item": {"sku": "A-1", "qty": 2}}')]))
    assert not accepts(vocab, gbnf, sample(fmt, [("launch", "{}")]))
    assert not accepts(vocab, gbnf, "The weather is nice.")


@pytest.mark.parametrize("fmt", FAMILY_FORMATS, ids=fmt_id)
def test_named_and_single_call_grammars(vocab: Vocab, fmt: ChatFormat) -> None:
    named = forced_call_grammar(fmt, TOOLS, "watch", parallel=False)
    assert accepts(vocab, named, sample(fmt, [("watch", WATCH_ARGS)]))
    assert not accepts(vocab, named, sample(fmt, [("get_weather", WEATHER_ARGS)]))
    if fmt.name in ("hermes", "mistral", "deepseek_r1"):
        assert not accepts(vocab, named, sample(fmt, [("watch", WATCH_ARGS), ("watch", WATCH_ARGS)]))


@pytest.mark.parametrize("fmt", [f for f in FAMILY_FORMATS if f.reasoning and f.name != "gpt_oss"], ids=fmt_id)
def test_reasoning_before_a_forced_call(vocab: Vocab, fmt: ChatFormat) -> None:
    opening, closing = fmt.reasoning_markers
    call = sample(fmt, [("get_time", "{}")])
    thought = f"Is a << b? Not {closing[:-1]} nor {opening}, [brackets] fine."
    optional = forced_call_grammar(fmt, TOOLS, None)
    assert accepts(vocab, optional, call)
    assert accepts(vocab, optional, f"{opening}\n{thought}\n{closing}\n\n{call}")
    opened = forced_call_grammar(fmt, TOOLS, None, prompt_opens_reasoning=True)
    assert not accepts(vocab, opened, call)
    text = f"{thought}\n{closing}\n\n{call}"
    assert accepts(vocab, opened, text)
    parsed = parse_output(fmt, text, prompt_opens_reasoning=True)
    assert (parsed.reasoning, [c.name for c in parsed.tool_calls]) == (thought, ["get_time"])


def test_harmony_analysis_before_a_forced_call(vocab: Vocab) -> None:
    text = "<|channel|>analysis<|message|>Need the time <|en.<|end|><|start|>assistant" + sample(
        GPT_OSS, [("get_time", "{}")])
    gbnf = forced_call_grammar(GPT_OSS, TOOLS, None)
    assert accepts(vocab, gbnf, text)
    assert not accepts(vocab, gbnf, "<|channel|>final<|message|>It is noon.")
    parsed = parse_output(GPT_OSS, text)
    assert (parsed.reasoning, [c.name for c in parsed.tool_calls]) == ("Need the time <|en.", ["get_time"])


def test_forced_grammar_refusals() -> None:
    def refused(param: str, *args: Any, **kwargs: Any) -> str:
        with pytest.raises(InvalidRequestError) as info:
            forced_call_grammar(*args, **kwargs)
        assert info.value.param == param
        return str(info.value)

    huge = tool("big", {"type": "object", "properties": {"s": {"type": "string", "maxLength": 100_000}}})
    assert "tools[1] (big)" in refused("tools", HERMES, [TOOLS[0], huge], None)
    assert "maxLength" in refused("tools", HERMES, [huge], None)
    refused("tool_choice", HERMES, TOOLS, "launch")
    refused("tool_choice", PLAIN, TOOLS, None)
    refused("tools", HERMES, [], None)
    refused("tools", HERMES, [tool("get weather")], None)
    refused("tools", HERMES, [tool("a"), tool("a")], None)
    refused("tools", HERMES, [tool("a", {"type": "string"})], None)
    refused("tools", HERMES, [{"type": "retrieval"}], None)
    refused("tools", HERMES, [tool(f"t{i}") for i in range(129)], None)


# ---------------------------------------------------------------------------------------------
# The fixture templates in jinja2's sandbox, as app/engine/chat.py renders templates


def sandbox() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.ChainableUndefined)

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "a1B2c3D4e", "type": "function",
         "function": {"name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius"}}}]},
    {"role": "tool", "tool_call_id": "a1B2c3D4e", "name": "get_weather", "content": '{"temperature": 21}'},
    {"role": "assistant", "content": "It is 21 °C."},
    {"role": "user", "content": "Thanks!"},
]


@pytest.mark.parametrize("name", sorted(EXPECTED_FORMATS))
def test_fixture_templates_compile_and_render_in_the_sandbox(name: str) -> None:
    compiled = sandbox().from_string(template(name))
    # Gemma 2's template knows neither system nor tool messages.
    messages = CONVERSATION[-1:] if name == "google-gemma-2-2b-it" else CONVERSATION
    prompt = compiled.render(messages=messages, tools=TOOLS[:1], add_generation_prompt=True,
                             bos_token="<s>", eos_token="</s>")
    assert "Thanks!" in prompt


@pytest.mark.parametrize(("name", "opens"), [
    ("Qwen-QwQ-32B", True),  # '<|im_start|>assistant\n<think>\n' then '</think>' only when enable_thinking is false
    ("Qwen-Qwen3-0.6B", False),  # the model opens <think> itself
    ("deepseek-ai-DeepSeek-R1-Distill-Llama-8B", True),
    ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", False),  # llama.cpp's copy closes it unless enable_thinking
    ("openai-gpt-oss-120b", False),
])
def test_which_prompts_open_reasoning(name: str, opens: bool) -> None:
    extra = {"enable_thinking": True} if name == "Qwen-QwQ-32B" else {}
    prompt = sandbox().from_string(template(name)).render(
        messages=CONVERSATION[:2], add_generation_prompt=True, bos_token="<s>", eos_token="</s>", **extra)
    assert prompt_opens_reasoning(prompt, detect_format(template(name)).reasoning_markers) == opens
