"""Tool calls and reasoning in a model's output, for the chat-template families llama.cpp knows.

A chat template decides how its model writes a tool call: Hermes 2 Pro and Qwen wrap JSON in
`<tool_call>` tags, Llama 3.x writes a bare JSON object (or `<|python_tag|>`), Mistral starts
with `[TOOL_CALLS]`, DeepSeek R1 has its own `<｜tool▁call▁begin｜>` tokens, and gpt-oss speaks
"harmony", in channels. `detect_format` reads the family from the template text, as llama.cpp's
common/chat does; `parse_output` splits a finished completion into content, reasoning and tool
calls; `StreamParser` does the same piece by piece; `forced_call_grammar` writes the GBNF that
makes a model call a tool in its family's own syntax.

One parser serves both paths: `parse_output` is a `StreamParser` fed the whole text, and the
stream parser only decides what a piece of text is once no continuation could change that
decision, so a stream joined up (`collect`) equals the whole parse, however the text was split.

Rules every family shares:
- whitespace next to markup (a reasoning span, a tool call, the text's two ends) is not content;
- a tool call counts only when it decodes into a name and a JSON object of arguments; anything
  else stays content, marker and all, so nothing the model wrote is lost;
- arguments are re-serialised compactly (ensure_ascii off): the model's spacing varies, and a
  call is announced only once it closed and decoded, so its `tool_call_start` and its whole
  arguments string arrive together (a call that later proved malformed was never announced).

The markers must be in the text: the engine has to render control tokens (`[TOOL_CALLS]`,
`<|python_tag|>`, `<|channel|>`, DeepSeek's tool tokens) when it detokenizes, or they vanish.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import re
import secrets
import string
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Protocol

from llama_cpp.llama_grammar import json_schema_to_gbnf

from app.engine.reasoning import gbnf_literal, until_marker_rules
from app.engine.schema_limits import check_grammar, check_schema
from app.engine.types import InvalidRequestError

log = logging.getLogger(__name__)

EventKind = Literal["content", "reasoning", "tool_call_start", "tool_call_arguments"]


@dataclass(frozen=True)
class ToolCall:
    """One call: `arguments` is a compact JSON object ('{}' when none), `id` the model's or a new one."""

    id: str
    name: str
    arguments: str


@dataclass
class ParsedOutput:
    """A whole completion split: `content` is '' when only calls remain, `reasoning` None when none."""

    content: str
    reasoning: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class StreamEvent:
    """One increment, shaped like an OpenAI delta."""

    kind: EventKind
    text: str = ""
    index: int = 0
    id: str = ""
    name: str = ""


@dataclass(frozen=True)
class ChatFormat:
    """A template family: how its model writes tool calls and reasoning.

    `variant` is the call syntax the family's grammar writes (Mistral: "json" for Nemo's
    `[TOOL_CALLS][{...}]`, "args" for `[TOOL_CALLS]name[ARGS]{...}`, "call_id" for Small 3.2's
    `[CALL_ID]`; DeepSeek: "r1" or "v3.1"); the parser reads every variant of its family.
    `reasoning_markers` open and close its reasoning span; give them to
    `app.engine.reasoning.prompt_opens_reasoning` with the rendered prompt to learn whether the
    output starts inside one. `dataclasses.replace(fmt, supports_tools=False)` keeps the
    reasoning split and leaves tool-call markup in the content.
    """

    name: str
    supports_tools: bool
    reasoning: bool
    variant: str = ""
    parallel_calls: bool = True
    reasoning_markers: tuple[str, str] = ("<think>", "</think>")


THINK = ("<think>", "</think>")
MISTRAL_THINK = ("[THINK]", "[/THINK]")
HARMONY_ANALYSIS = ("<|channel|>analysis<|message|>", "<|end|>")

FORMATS: Mapping[str, ChatFormat] = MappingProxyType({
    "hermes": ChatFormat("hermes", True, True),
    # The Llama 3.x templates refuse to render more than one call per message.
    "llama3": ChatFormat("llama3", True, False, parallel_calls=False),
    "mistral": ChatFormat("mistral", True, True, variant="json", reasoning_markers=MISTRAL_THINK),
    "deepseek_r1": ChatFormat("deepseek_r1", True, True, variant="r1"),
    # Harmony ends generation at <|call|>: one call per turn.
    "gpt_oss": ChatFormat("gpt_oss", True, True, parallel_calls=False, reasoning_markers=HARMONY_ANALYSIS),
    "plain": ChatFormat("plain", False, False),
})

# Hermes-style templates show the call as JSON with a "name" key (escaped inside Jinja strings).
_HERMES_JSON = re.compile(r'\{\\?"name\\?"\s*:')
# <tool_call> also wraps XML-style calls (Qwen3-Coder, GLM, MiniMax): not this parser's syntax.
_XML_CALL_MARKERS = ("<function=", "<parameter=", "<arg_key>", "<invoke")
R1_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
R1_CALLS_END = "<｜tool▁calls▁end｜>"
R1_CALL_BEGIN = "<｜tool▁call▁begin｜>"
R1_CALL_END = "<｜tool▁call▁end｜>"
R1_SEP = "<｜tool▁sep｜>"


def format_named(name: str) -> ChatFormat:
    """The family called `name` (the --tool-format override); ValueError for an unknown one."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown tool-call format {name!r}; choose from {', '.join(FORMATS)}") from None


def detect_format(template_source: str | None) -> ChatFormat:
    """The family a chat template belongs to, from the markers it writes (as llama.cpp's common/chat)."""
    src = template_source or ""
    has_think = THINK[0] in src and THINK[1] in src
    if "<|channel|>" in src:
        return FORMATS["gpt_oss"]
    if "[TOOL_CALLS]" in src:
        variant = "call_id" if "[CALL_ID]" in src else "args" if "[ARGS]" in src else "json"
        return dataclasses.replace(FORMATS["mistral"], variant=variant, reasoning=MISTRAL_THINK[0] in src)
    if R1_CALLS_BEGIN in src:
        return dataclasses.replace(FORMATS["deepseek_r1"], variant="r1" if "```json" in src else "v3.1",
                                   reasoning=has_think)
    if "<tool_call>" in src and _HERMES_JSON.search(src) and not any(m in src for m in _XML_CALL_MARKERS):
        return dataclasses.replace(FORMATS["hermes"], reasoning=has_think)
    if ("<|python_tag|>" in src or "<|start_header_id|>ipython" in src) and "<function=" not in src:
        return FORMATS["llama3"]
    if src and "tools" in src:
        log.debug("chat template mentions tools in a syntax this parser does not read: no tool calls")
    return dataclasses.replace(FORMATS["plain"], reasoning=has_think)


def collect(events: Iterable[StreamEvent]) -> ParsedOutput:
    """Join a stream's events into one message: texts concatenated, calls by index."""
    content: list[str] = []
    reasoning: list[str] = []
    calls: dict[int, list[str]] = {}
    for event in events:
        if event.kind == "content":
            content.append(event.text)
        elif event.kind == "reasoning":
            reasoning.append(event.text)
        elif event.kind == "tool_call_start":
            calls[event.index] = [event.id, event.name, ""]
        else:
            calls[event.index][2] += event.text
    return ParsedOutput("".join(content), "".join(reasoning) or None,
                        [ToolCall(*calls[index]) for index in sorted(calls)])


def parse_output(fmt: ChatFormat, text: str, *, reasoning: bool = True,
                 prompt_opens_reasoning: bool = False) -> ParsedOutput:
    """Split a finished completion into content, reasoning and tool calls.

    `reasoning=False` leaves reasoning in the content as written; `prompt_opens_reasoning` says
    the prompt ended inside a reasoning span (see `app.engine.reasoning.prompt_opens_reasoning`).
    """
    parser = StreamParser(fmt, reasoning=reasoning, prompt_opens_reasoning=prompt_opens_reasoning)
    return collect(parser.feed(text) + parser.finish())


# ---------------------------------------------------------------------------------------------
# Decoding one call's text


@dataclass(frozen=True)
class _Call:
    name: str
    arguments: str
    id: str | None = None


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_ALPHANUMERIC = string.ascii_letters + string.digits


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _canonical(value: dict[str, Any]) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    # A "\ud800" escape decodes to a lone surrogate, which no UTF-8 response can carry: escape it again.
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _json_values(text: str, separators: str = "") -> list[Any] | None:
    """The JSON values `text` holds, separated by whitespace (and `separators`); None if anything else."""
    decoder = json.JSONDecoder(parse_constant=_reject_constant)
    values: list[Any] = []
    at = 0
    while True:
        while at < len(text) and (text[at].isspace() or (values and text[at] in separators)):
            at += 1
        if at == len(text):
            return values or None
        try:
            value, at = decoder.raw_decode(text, at)
        except (ValueError, RecursionError):
            return None
        values.append(value)


def _arguments(value: Any) -> str | None:
    """Canonical arguments: an object, or a string holding one; None and '' mean no arguments."""
    if value is None or value == "":
        return "{}"
    if isinstance(value, str):
        decoded = _json_values(value)
        value = decoded[0] if decoded and len(decoded) == 1 else None
    return _canonical(value) if isinstance(value, dict) else None


def _valid_name(name: Any) -> bool:
    return isinstance(name, str) and bool(name.strip()) and not _LONE_SURROGATE.search(name)


def _call_from_object(obj: Any, argument_keys: tuple[str, ...]) -> _Call | None:
    """A call from {"name": ..., "arguments"|"parameters": ...} (or OpenAI's {"function": {...}})."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict) and "name" not in obj:
        obj = {**obj["function"], "id": obj.get("id")}
    name = obj.get("name")
    if not _valid_name(name):
        return None
    value = next((obj[key] for key in argument_keys if key in obj), None)
    arguments = _arguments(value)
    if arguments is None:
        return None
    call_id = obj.get("id")
    return _Call(name.strip(), arguments, call_id if isinstance(call_id, str) and call_id else None)


def _calls_from_json(text: str, argument_keys: tuple[str, ...], separators: str = "") -> list[_Call] | None:
    values = _json_values(text, separators)
    if values is None:
        return None
    objects: list[Any] = []
    for value in values:
        objects.extend(value if isinstance(value, list) else [value])
    calls = [_call_from_object(obj, argument_keys) for obj in objects]
    if not calls or any(call is None for call in calls):
        return None
    return [call for call in calls if call is not None]


def _decode_hermes(body: str) -> list[_Call] | None:
    return _calls_from_json(body, ("arguments", "parameters"))


def _decode_llama_json(body: str) -> list[_Call] | None:
    return _calls_from_json(body, ("parameters", "arguments"), separators=";")


_MAX_PYTHON_CALL = 16_384


def _decode_python_tag(body: str) -> list[_Call] | None:
    """Llama 3.1's `<|python_tag|>`: JSON calls, or a built-in tool's `name.call(key=value, ...)`."""
    text = body.strip()
    if text.startswith("{"):
        return _decode_llama_json(text)
    if len(text) > _MAX_PYTHON_CALL:
        return None
    try:
        node = ast.parse(text, mode="eval").body
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "call"
                and isinstance(node.func.value, ast.Name) and not node.args):
            return None
        # literal_eval only reads literals: the model's text is never executed.
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
        if len(kwargs) != len(node.keywords):
            return None
        arguments = _canonical(kwargs)
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return None
    return [_Call(node.func.value.id, arguments)]


_MISTRAL_CALL = re.compile(r"\s*([^\s\[\]{}\"]+)(?:\[CALL_ID\]([A-Za-z0-9]+))?\[ARGS\](.*)", re.S)


def _decode_mistral(body: str) -> list[_Call] | None:
    """Nemo's `[{"name", "arguments", "id"}]`, or Small 3.2 / Devstral's `name[CALL_ID]id[ARGS]{...}`."""
    if body.lstrip()[:1] in ("[", "{"):
        return _calls_from_json(body, ("arguments", "parameters"))
    match = _MISTRAL_CALL.fullmatch(body)
    if not match:
        return None
    values = _json_values(match.group(3))
    arguments = _arguments(values[0]) if values and len(values) == 1 and isinstance(values[0], dict) else None
    if arguments is None:
        return None
    return [_Call(match.group(1), arguments, match.group(2))]


_FENCE = re.compile(r"\s*(?:```(?:json)?)?\s*(.*?)\s*(?:```)?\s*", re.S)


def _decode_deepseek(body: str) -> list[_Call] | None:
    """R1's `function<｜tool▁sep｜>name\\n```json\\n{...}\\n```` or V3.1's `name<｜tool▁sep｜>{...}`."""
    head, sep, tail = body.partition(R1_SEP)
    if not sep:
        return None
    if head.strip() in ("", "function"):
        name, _, tail = tail.partition("\n")
    else:
        name = head
    fenced = _FENCE.fullmatch(tail)
    values = _json_values(fenced.group(1) if fenced else tail)
    if not values or len(values) != 1 or not isinstance(values[0], dict) or not _valid_name(name):
        return None
    return [_Call(name.strip(), _canonical(values[0]))]


# ---------------------------------------------------------------------------------------------
# Where a call's text ends


class _Closer(Protocol):
    def scan(self, body: str) -> tuple[int, int] | None:
        """(end of the call's text, end of its markup) once the body holds them, else None."""


class _UntilMarker:
    """A call closed by a marker; of several, the one whose occurrence ends first wins."""

    def __init__(self, *markers: str) -> None:
        self._markers = markers
        self._from = 0

    def scan(self, body: str) -> tuple[int, int] | None:
        found = [(at + len(m), at) for m in self._markers if (at := body.find(m, self._from)) >= 0]
        if found:
            end, at = min(found)
            return at, end
        self._from = max(0, len(body) - max(map(len, self._markers)) + 1)
        return None


class _JsonEnd:
    """A call that is one JSON object or array, ending where its brackets balance."""

    def __init__(self, start: int = 0) -> None:
        self._at = start
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def scan(self, body: str) -> tuple[int, int] | None:
        at = self._at
        while at < len(body):
            char = body[at]
            if self._depth == 0:
                if not char.isspace():
                    if char not in "{[":
                        return at, at  # not JSON: the call ends unparsed here
                    self._depth = 1
            elif self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return at + 1, at + 1
            at += 1
        self._at = at
        return None


_MISTRAL_HEAD = re.compile(r"\s*[^\s{}\"]*")
_MISTRAL_MAX_HEAD = 256


class _MistralEnd:
    """After [TOOL_CALLS]: a JSON array (Nemo), or `name[CALL_ID]id[ARGS]` then a JSON object."""

    def __init__(self) -> None:
        self._json: _JsonEnd | None = None

    def scan(self, body: str) -> tuple[int, int] | None:
        if self._json is None:
            start = len(body) - len(body.lstrip())
            if start == len(body):
                return None
            if body[start] in "[{":
                self._json = _JsonEnd(start)
            else:
                args = body.find("[ARGS]")
                head = body if args < 0 else body[:args]
                # A name has no spaces, quotes or braces and is short: else the call ends here, unparsed.
                # (Once failed, no later text could mend it, so the decision never depends on the split.)
                bad = _MISTRAL_HEAD.match(head).end()  # type: ignore[union-attr]
                if bad < len(head) or _partial_at(head, "[ARGS]") > _MISTRAL_MAX_HEAD:
                    return bad, bad
                if args < 0:
                    return None
                self._json = _JsonEnd(args + len("[ARGS]"))
        return self._json.scan(body)


# ---------------------------------------------------------------------------------------------
# The streaming machines


class _Sink:
    """Text bound for one field; when stripping, whitespace next to markup and the ends is dropped.

    Trailing whitespace is held until text follows it, so whether a piece of whitespace is kept
    never depends on how the text was split.
    """

    def __init__(self, kind: EventKind, out: list[StreamEvent], strip: bool) -> None:
        self._kind: EventKind = kind
        self._out = out
        self._strip = strip
        self._held = ""
        self._skipping = strip
        self._skip_also = ""
        self.seen = False

    def skippable(self, text: str) -> int:
        """How many leading characters of `text` this sink would drop now."""
        if not self._skipping:
            return 0
        at = 0
        while at < len(text) and (text[at].isspace() or text[at] in self._skip_also):
            at += 1
        return at

    def add(self, text: str) -> None:
        if self._strip:
            skip = self.skippable(text)
            if skip == len(text):
                return
            self._skipping = False
            text = self._held + text[skip:]
            kept = text.rstrip()
            self._held = text[len(kept):]
            text = kept
        if text:
            self.seen = True
            self._out.append(StreamEvent(self._kind, text))

    def boundary(self, skip_also: str = "") -> None:
        """Markup comes here: drop the whitespace on both sides of it."""
        if self._strip:
            self._held = ""
            self._skipping = True
            self._skip_also = skip_also


def _partial_at(buf: str, marker: str) -> int:
    """Where a prefix of `marker` starts at the end of `buf` (len(buf) if none)."""
    for size in range(min(len(marker) - 1, len(buf)), 0, -1):
        if buf.endswith(marker[:size]):
            return len(buf) - size
    return len(buf)


@dataclass(frozen=True)
class _Opener:
    marker: str
    kind: Literal["reasoning", "call", "drop"]
    # Only before any content (Llama's bare JSON call, a reasoning span).
    at_start: bool = False
    # The marker belongs to the call's text (Llama's "{").
    keep_marker: bool = False
    closer: Callable[[], _Closer] | None = None
    decode: Callable[[str], list[_Call] | None] | None = None
    # False once the body can no longer become a call (Llama: a JSON object whose first key is not "name").
    viable: Callable[[str], bool] | None = None
    skip_after: str = ""


_LLAMA_KEY = re.compile(r'\{\s*(?:"([^"\\]*)("?))?')


def _json_viable(body: str) -> bool:
    """A JSON call starts with a bracket."""
    text = body.lstrip()
    return not text or text[0] in "{["


def _llama_viable(body: str) -> bool:
    match = _LLAMA_KEY.match(body)
    if match is None or (match.end() < len(body) and match.group(1) is None):
        return False
    key, closed = match.group(1), match.group(2)
    if key is None:
        return True
    return key in ("name", "type") if closed else any(k.startswith(key) for k in ("name", "type"))


def _openers(fmt: ChatFormat, reasoning: bool) -> list[_Opener]:
    openers = []
    if reasoning and fmt.reasoning:
        openers.append(_Opener(fmt.reasoning_markers[0], "reasoning", at_start=True))
    if not fmt.supports_tools:
        return openers
    if fmt.name == "hermes":
        openers.append(_Opener("<tool_call>", "call", closer=lambda: _UntilMarker("</tool_call>"),
                               decode=_decode_hermes, viable=_json_viable))
    elif fmt.name == "llama3":
        openers.append(_Opener("<|python_tag|>", "call", closer=lambda: _UntilMarker("<|eom_id|>", "<|eot_id|>"),
                               decode=_decode_python_tag))
        openers.append(_Opener("{", "call", at_start=True, keep_marker=True, closer=_JsonEnd,
                               decode=_decode_llama_json, viable=_llama_viable, skip_after=";"))
    elif fmt.name == "mistral":
        openers.append(_Opener("[TOOL_CALLS]", "call", closer=_MistralEnd, decode=_decode_mistral))
    elif fmt.name == "deepseek_r1":
        openers.append(_Opener(R1_CALLS_BEGIN, "drop"))
        openers.append(_Opener(R1_CALLS_END, "drop"))
        openers.append(_Opener(R1_CALL_BEGIN, "call", closer=lambda: _UntilMarker(R1_CALL_END),
                               decode=_decode_deepseek))
    return openers


class _Machine:
    """Reads buffered text in steps; a step acts only on what no later text could change.

    This base passes text through untouched: the plain format, with nothing to parse.
    """

    def __init__(self, out: list[StreamEvent], emit_calls: Callable[[list[_Call]], None], strip: bool) -> None:
        self.buf = ""
        self.content = _Sink("content", out, strip)
        self.thought = _Sink("reasoning", out, strip)
        self._emit_calls = emit_calls

    def step(self, final: bool) -> bool:
        """Act on the buffer; False when nothing more can be done until more text (or the end) comes."""
        self.content.add(self.buf)
        self.buf = ""
        return False


class _Markup(_Machine):
    """Content with markup in it: reasoning spans, tool calls, markers to drop."""

    def __init__(self, fmt: ChatFormat, reasoning: bool, opens: bool, out: list[StreamEvent],
                 emit_calls: Callable[[list[_Call]], None]) -> None:
        super().__init__(out, emit_calls, strip=True)
        self._openers = _openers(fmt, reasoning)
        self._markers = fmt.reasoning_markers
        self._in_reasoning = reasoning and fmt.reasoning and opens
        # The prompt opened the span: the model may still write the open marker itself.
        self._fresh = self._in_reasoning
        self._started = self._in_reasoning
        self._opener: _Opener | None = None
        self._closer: _Closer | None = None
        self._body = ""

    def step(self, final: bool) -> bool:
        if self._opener is not None:
            return self._step_call(final)
        if self._in_reasoning:
            return self._step_reasoning(final)
        return self._step_text(final)

    def _step_text(self, final: bool) -> bool:
        buf = self.buf
        hold = len(buf)
        best: tuple[int, _Opener] | None = None
        for opener in self._openers:
            if opener.at_start:
                if self.content.seen or (opener.kind == "reasoning" and self._started):
                    continue
                at = self.content.skippable(buf)
                if not buf.startswith(opener.marker, at):
                    if not final and opener.marker.startswith(buf[at:]):
                        hold = min(hold, at)
                    continue
            else:
                at = buf.find(opener.marker)
                if not final:
                    hold = min(hold, _partial_at(buf, opener.marker))
                if at < 0:
                    continue
            if best is None or at < best[0]:
                best = (at, opener)
        if best is None or best[0] >= hold:
            self.content.add(buf[:hold])
            self.buf = buf[hold:]
            return hold > 0
        at, opener = best
        self.content.add(buf[:at])
        self.buf = buf[at + len(opener.marker):]
        if opener.kind == "call":
            assert opener.closer is not None
            self._opener, self._closer = opener, opener.closer()
            self._body = opener.marker if opener.keep_marker else ""
        else:
            self.content.boundary()
            if opener.kind == "reasoning":
                self._in_reasoning = self._started = True
        return True

    def _step_reasoning(self, final: bool) -> bool:
        opening, closing = self._markers
        if self._fresh:
            at = len(self.buf) - len(self.buf.lstrip())
            if self.buf.startswith(opening, at):
                self.buf = self.buf[at + len(opening):]
            elif opening.startswith(self.buf[at:]) and not final:
                return False
            self._fresh = False
        at = self.buf.find(closing)
        if at >= 0:
            self.thought.add(self.buf[:at])
            self.thought.boundary()
            self.content.boundary()
            self.buf = self.buf[at + len(closing):]
            self._in_reasoning = False
            return True
        hold = len(self.buf) if final else _partial_at(self.buf, closing)
        self.thought.add(self.buf[:hold])
        self.buf = self.buf[hold:]
        return hold > 0

    def _step_call(self, final: bool) -> bool:
        opener, closer = self._opener, self._closer
        assert opener is not None and closer is not None and opener.decode is not None
        self._body += self.buf
        self.buf = ""
        end = closer.scan(self._body)
        if end is None and not final:
            if opener.viable is None or opener.viable(self._body):
                return False
            return self._give_up()
        text_end, markup_end = end or (len(self._body), len(self._body))
        if opener.viable is not None and not opener.viable(self._body[:markup_end]):
            return self._give_up()
        calls = opener.decode(self._body[:text_end])
        if calls is None:
            return self._give_up()
        self.buf = self._body[markup_end:]
        self._opener = self._closer = None
        self._started = True
        self.content.boundary(opener.skip_after)
        self._emit_calls(calls)
        return True

    def _give_up(self) -> bool:
        """Not a call: its marker is content, and what followed is read again as text."""
        assert self._opener is not None
        marker = self._opener.marker
        self.content.add(marker)
        self.buf = self._body[len(marker):] if self._opener.keep_marker else self._body
        self._opener = self._closer = None
        return True


_HARMONY_MESSAGE = "<|message|>"
# Consumed: they end a message. Not consumed: they begin the next one's header.
_HARMONY_ENDS = ("<|end|>", "<|call|>", "<|return|>")
_HARMONY_NEXT = ("<|start|>", "<|channel|>")
_HARMONY_HEADER_STARTS = ("<|start|>", "<|channel|>", "<|constrain|>", "to=", "assistant")
_HARMONY_CHANNEL = re.compile(r"<\|channel\|>\s*(\w+)")
_HARMONY_RECIPIENT = re.compile(r"to=([^\s<]+)")


_HARMONY_MAX_HEADER = 256


def _harmony_header_viable(header: str) -> bool:
    text = header.lstrip()
    return len(text) <= _HARMONY_MAX_HEADER and not any(end in text for end in _HARMONY_ENDS) and any(
        text.startswith(start) or start.startswith(text) for start in _HARMONY_HEADER_STARTS)


class _Harmony(_Machine):
    """gpt-oss: messages of `header<|message|>body<|end|>`; the channel decides where a body goes.

    analysis → reasoning (or, when reasoning is not split, the raw message into content), final and
    commentary → content, a header with `to=functions.NAME` → a call whose body is its arguments.
    The first header follows the prompt's `<|start|>assistant`.
    """

    def __init__(self, reasoning: bool, tools: bool, out: list[StreamEvent],
                 emit_calls: Callable[[list[_Call]], None]) -> None:
        super().__init__(out, emit_calls, strip=True)
        self._reasoning = reasoning
        self._tools = tools
        self._in_header = True
        self._channel = "final"
        self._recipient: str | None = None
        self._body = ""

    def step(self, final: bool) -> bool:
        return self._step_header(final) if self._in_header else self._step_body(final)

    def _step_header(self, final: bool) -> bool:
        at = self.buf.find(_HARMONY_MESSAGE)
        header = self.buf[:at] if at >= 0 else self.buf[:_partial_at(self.buf, _HARMONY_MESSAGE)]
        if not self.buf or (at < 0 and not final and _harmony_header_viable(header)):
            return False
        self._in_header = False
        self._body = ""
        if at < 0 or not _harmony_header_viable(header):
            # Not a header: plain text, which belongs to the answer. Its first character goes at once,
            # so the body cannot hand the same text straight back as a header.
            self._channel, self._recipient = "final", None
            self._send(self.buf[:1])
            self.buf = self.buf[1:]
            return True
        channels = _HARMONY_CHANNEL.findall(header)
        self._channel = channels[-1] if channels else "final"
        recipient = _HARMONY_RECIPIENT.search(header)
        addressed = recipient is not None and recipient.group(1) != "assistant" and self._tools
        self._recipient = recipient.group(1) if addressed and recipient is not None else None
        self.buf = self.buf[at + len(_HARMONY_MESSAGE):]
        if self._channel == "analysis" and not self._reasoning and self._recipient is None:
            self.content.add(header.strip() + _HARMONY_MESSAGE)
        return True

    def _step_body(self, final: bool) -> bool:
        buf = self.buf
        found = [(at, m) for m in _HARMONY_ENDS + _HARMONY_NEXT if (at := buf.find(m)) >= 0]
        hold = len(buf) if final else min(_partial_at(buf, m) for m in _HARMONY_ENDS + _HARMONY_NEXT)
        at, marker = min(found) if found else (len(buf), "")
        if marker and at < hold:
            self._send(buf[:at])
            self.buf = buf[at + len(marker):] if marker in _HARMONY_ENDS else buf[at:]
            self._close(marker)
            return True
        if final:
            self._send(buf)
            self.buf = ""
            self._close("")
            return True
        self._send(buf[:hold])
        self.buf = buf[hold:]
        return hold > 0

    def _send(self, text: str) -> None:
        if self._recipient is not None:
            self._body += text
        elif self._channel == "analysis" and self._reasoning:
            self.thought.add(text)
        else:
            self.content.add(text)

    def _close(self, marker: str) -> None:
        if self._recipient is not None:
            name = self._recipient.removeprefix("functions.")
            values = _json_values(self._body)
            arguments = _arguments(values[0]) if values and len(values) == 1 and isinstance(values[0], dict) else None
            if arguments is not None and _valid_name(name):
                self.content.boundary()
                self._emit_calls([_Call(name, arguments)])
            else:
                self.content.add(self._body)
        elif self._channel == "analysis" and not self._reasoning and marker in _HARMONY_ENDS:
            self.content.add(marker)
        self.content.boundary()
        self.thought.boundary()
        self._in_header = True


def _new_id(fmt: ChatFormat) -> str:
    # Mistral's templates refuse a history whose call ids are not 9 alphanumerics.
    if fmt.name == "mistral":
        return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(9))
    return "call_" + "".join(secrets.choice(_ALPHANUMERIC) for _ in range(24))


class StreamParser:
    """Parse a completion as it is generated: `feed` each piece, then `finish` once.

    Text that could still turn out to be markup (a partial marker, whitespace before one, an
    unclosed call) is held back until it is decided; `finish` decides the rest: an unclosed call
    that decodes counts, one that does not becomes content.
    """

    def __init__(self, fmt: ChatFormat, *, reasoning: bool = True, prompt_opens_reasoning: bool = False) -> None:
        self._fmt = fmt
        self._out: list[StreamEvent] = []
        self._calls = 0
        self._finished = False
        self._machine: _Machine
        if fmt.name == "gpt_oss":
            self._machine = _Harmony(reasoning and fmt.reasoning, fmt.supports_tools, self._out, self._emit_calls)
        elif fmt.supports_tools or (reasoning and fmt.reasoning):
            self._machine = _Markup(fmt, reasoning, prompt_opens_reasoning, self._out, self._emit_calls)
        else:
            self._machine = _Machine(self._out, self._emit_calls, strip=False)

    def feed(self, text: str) -> list[StreamEvent]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._machine.buf += text
        return self._drain(final=False)

    def finish(self) -> list[StreamEvent]:
        if self._finished:
            return []
        self._finished = True
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[StreamEvent]:
        while self._machine.step(final):
            pass
        events = list(self._out)
        self._out.clear()
        return events

    def _emit_calls(self, calls: list[_Call]) -> None:
        for call in calls:
            index = self._calls
            self._calls += 1
            self._out.append(StreamEvent("tool_call_start", index=index, id=call.id or _new_id(self._fmt),
                                         name=call.name))
            self._out.append(StreamEvent("tool_call_arguments", text=call.arguments, index=index))


# ---------------------------------------------------------------------------------------------
# Forcing a call with a grammar

MAX_TOOLS = 128
_TOOL_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_GBNF_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|\{[^}]*\}|[A-Za-z0-9-]+|\s+|.', re.S)
_GBNF_RULE = re.compile(r"^([A-Za-z0-9-]+) ::=", re.M)
_REFUSED_PREFIX = "response_format schema refused: "


def _refuse(message: str, param: str = "tools") -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


def _tool_specs(tools: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(name, parameters schema) of each function tool, checked."""
    if not isinstance(tools, list) or not tools:
        raise _refuse("tools must be a non-empty list")
    if len(tools) > MAX_TOOLS:
        raise _refuse(f"{len(tools)} tools exceed the limit of {MAX_TOOLS}")
    specs: list[tuple[str, dict[str, Any]]] = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" \
            else None
        if not isinstance(function, dict):
            raise _refuse(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        name = function.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise _refuse(f"tools[{i}].function.name must be 1 to 64 letters, digits, '_', '.' or '-'")
        if any(name == seen for seen, _ in specs):
            raise _refuse(f"tools[{i}]: a second function named {name!r}")
        params = function.get("parameters")
        if params is None or params == {}:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise _refuse(f"tools[{i}].function.parameters must be a JSON Schema of type object")
        specs.append((name, params))
    return specs


def _prefix_rules(gbnf: str, prefix: str) -> str:
    """The grammar with each of its rule names prefixed, references included (literals untouched)."""
    defined = set(_GBNF_RULE.findall(gbnf))
    return "".join(prefix + token if token in defined else token for token in _GBNF_TOKEN.findall(gbnf))


def _arguments_grammar(index: int, name: str, params: dict[str, Any]) -> str:
    try:
        check_schema(params)
    except InvalidRequestError as exc:
        raise _refuse(f"tools[{index}] ({name}) parameters refused: {str(exc).removeprefix(_REFUSED_PREFIX)}") \
            from None
    try:
        gbnf = json_schema_to_gbnf(json.dumps(params))
    except Exception as exc:  # the converter raises assorted errors on schemas it cannot express
        raise _refuse(f"tools[{index}] ({name}) parameters cannot be enforced: {str(exc)[:300]}") from None
    return _prefix_rules(gbnf, f"t{index}-")


def _call_alternative(fmt: ChatFormat, index: int, name: str) -> str:
    """One tool's call in the family's syntax, around its arguments rule `t<index>-root`."""
    args = f"t{index}-root"
    if fmt.name in ("hermes", "llama3") or (fmt.name == "mistral" and fmt.variant == "json"):
        key = "parameters" if fmt.name == "llama3" else "arguments"
        head = gbnf_literal('{"name": "' + name + '", "' + key + '": ')
        return f'{head} {args} "}}"'
    if fmt.name == "mistral":
        call_id = ' "[CALL_ID]" call-id' if fmt.variant == "call_id" else ""
        return f'{gbnf_literal(name)}{call_id} "[ARGS]" {args}'
    if fmt.name == "deepseek_r1":
        if fmt.variant == "r1":
            head, tail = gbnf_literal(name + "\n```json\n"), gbnf_literal("\n```")
            return f"{head} {args} {tail}"
        return f"{gbnf_literal(name + R1_SEP)} {args}"
    return f'{gbnf_literal(name + " <|constrain|>json<|message|>")} {args}'


def _calls_rule(fmt: ChatFormat, parallel: bool) -> list[str]:
    """`calls`: one call (or, parallel, several) wrapped in the family's markup around `call`."""
    many = parallel and fmt.parallel_calls
    if fmt.name == "hermes":
        block = r'"<tool_call>\n" call "\n</tool_call>"'
        return [f"calls ::= {block}" + (rf' ("\n" {block})*' if many else "")]
    if fmt.name == "llama3":
        return ["calls ::= call"]
    if fmt.name == "mistral":
        if fmt.variant == "json":
            return ['calls ::= "[TOOL_CALLS][" call' + (' (", " call)*' if many else "") + ' "]"']
        rules = ['calls ::= ("[TOOL_CALLS]" call)' + ("+" if many else "")]
        if fmt.variant == "call_id":
            rules.append("call-id ::= [A-Za-z0-9]{9}")
        return rules
    if fmt.name == "deepseek_r1":
        head = R1_CALL_BEGIN + ("function" + R1_SEP if fmt.variant == "r1" else "")
        one = f"{gbnf_literal(head)} call {gbnf_literal(R1_CALL_END)}"
        separator = '"\\n" ' if fmt.variant == "r1" else ""
        repeat = f" ({separator}{one})*" if many else ""
        return [f"calls ::= {gbnf_literal(R1_CALLS_BEGIN)} {one}{repeat} {gbnf_literal(R1_CALLS_END)}"]
    return ['calls ::= "<|channel|>commentary to=functions." call']


def _reasoning_rules(fmt: ChatFormat, prompt_opens_reasoning: bool) -> tuple[str, list[str]]:
    """What may come before the calls: the rest of an open reasoning span, or an optional whole one."""
    if fmt.name == "gpt_oss":
        opening, closing = HARMONY_ANALYSIS
        return (f"({gbnf_literal(opening)} think-0 \"<|start|>assistant\")? ",
                until_marker_rules("think", closing))
    if not fmt.reasoning:
        return "", []
    opening, closing = fmt.reasoning_markers
    rules = until_marker_rules("think", closing) + [r"think-gap ::= [ \n]{0,2}"]
    if prompt_opens_reasoning:
        return "think-0 think-gap ", rules
    return f"({gbnf_literal(opening)} think-0 think-gap)? ", rules


def forced_call_grammar(fmt: ChatFormat, tools: list[dict[str, Any]], choice: str | None, *,
                        parallel: bool = True, prompt_opens_reasoning: bool = False) -> str:
    """GBNF that makes the model call a tool in its family's syntax, arguments per the tool's schema.

    `choice` None allows any of the tools (tool_choice "required"), a name only that function.
    Reasoning formats may reason first (must, when the prompt opened the span). Each schema is
    bounded as a response_format schema is, and refused with param "tools".
    """
    if not fmt.supports_tools:
        raise _refuse(f"the {fmt.name!r} chat format has no tool-call syntax to force", "tool_choice")
    specs = list(enumerate(_tool_specs(tools)))
    if choice is not None:
        specs = [(i, spec) for i, spec in specs if spec[0] == choice]
        if not specs:
            raise _refuse(f"tool_choice names {choice!r}, which is not among the tools", "tool_choice")
    prefix, rules = _reasoning_rules(fmt, prompt_opens_reasoning)
    alternatives = []
    for index, (name, params) in specs:
        rules.append(_arguments_grammar(index, name, params))
        alternatives.append(_call_alternative(fmt, index, name))
    rules.append("call ::= " + " | ".join(alternatives))
    rules.extend(_calls_rule(fmt, parallel))
    gbnf = "\n".join([f"root ::= {prefix}calls", *rules]) + "\n"
    try:
        check_grammar(gbnf)
    except InvalidRequestError as exc:
        raise _refuse(f"tools refused: {str(exc).removeprefix(_REFUSED_PREFIX)}") from None
    return gbnf
