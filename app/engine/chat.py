"""Turn OpenAI chat messages into a prompt with a Jinja chat template.

The model's own template (GGUF `tokenizer.chat_template`) is used when it has
one. A GGUF without a template gets ChatML, as llama.cpp's server does, and
`--chat-format` picks a built-in template explicitly.
"""

from __future__ import annotations

import datetime
import json
import logging
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

log = logging.getLogger(__name__)

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

GEMMA = (
    "{{ bos_token }}"
    "{% set system = namespace(text='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set system.text = system.text + message['content'] + '\n\n' %}"
    "{% else %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if role == 'user' and system.text %}{{ system.text }}{% set system.text = '' %}{% endif %}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# name -> (template, stop strings that end the assistant's turn)
CHAT_FORMATS: dict[str, tuple[str, list[str]]] = {
    "chatml": (CHATML, ["<|im_end|>", "<|im_start|>"]),
    "gemma": (GEMMA, ["<end_of_turn>", "<start_of_turn>"]),
    "llama3": (LLAMA3, ["<|eot_id|>"]),
}

class ChatTemplateError(ValueError):
    """The messages cannot be rendered by the template (the template said why)."""


@dataclass
class ChatTemplate:
    name: str
    source: str
    stop: list[str]
    bos_token: str
    eos_token: str

    def __post_init__(self) -> None:
        # Released templates use loop controls ({% break %}) and expect tojson to write plain JSON (jinja2's own
        # escapes <, > and & for HTML, which would change the prompt the model was trained on).
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.ChainableUndefined,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = plain_tojson

        def raise_exception(message: str) -> None:
            raise ChatTemplateError(message)

        def strftime_now(fmt: str) -> str:
            return datetime.datetime.now().strftime(fmt)

        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        try:
            self._template = env.from_string(self.source)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"chat template {self.name!r} does not compile: {exc}") from None

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, kwargs: dict[str, Any] | None = None) -> str:
        """The prompt text; `tools` (OpenAI function tools) and `kwargs` (chat_template_kwargs, e.g.
        enable_thinking) reach the template as its authors intended."""
        variables: dict[str, Any] = dict(kwargs or {})
        variables.update(messages=messages, add_generation_prompt=add_generation_prompt,
                         bos_token=self.bos_token, eos_token=self.eos_token)
        if tools:
            variables["tools"] = tools
        try:
            return self._template.render(**variables)
        except ChatTemplateError:
            raise
        except Exception as exc:  # a template is user data: any failure is a bad request, not a crash
            raise ChatTemplateError(f"chat template failed on these messages: {exc}") from None


def plain_tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, separators: Any = None,
                 sort_keys: bool = False) -> str:
    """tojson as the templates' authors ran it (Python's json.dumps, as transformers and llama.cpp's minja do)."""
    if separators is not None:
        separators = tuple(separators)
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)


def select_template(chat_format: str, model_template: str | None, bos: str, eos: str) -> ChatTemplate:
    """The template to use: explicit format, else the model's, else ChatML (logged)."""
    if chat_format != "auto":
        source, stop = CHAT_FORMATS[chat_format]
        log.info("chat format: %s (from --chat-format)", chat_format)
        return ChatTemplate(chat_format, source, list(stop), bos, eos)
    if model_template:
        log.info("chat format: the model's own template")
        stop = [eos] if eos else []
        for _, (_, fmt_stop) in CHAT_FORMATS.items():
            stop += [s for s in fmt_stop if s in model_template and s not in stop]
        return ChatTemplate("model", model_template, stop, bos, eos)
    log.warning("the model has no chat template: falling back to ChatML (use --chat-format to choose another)")
    source, stop = CHAT_FORMATS["chatml"]
    return ChatTemplate("chatml", source, list(stop), bos, eos)


def flatten_content(content: Any) -> str:
    """OpenAI content may be a string or a list of parts; templates want text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if isinstance(part, dict):
            if part.get("type") not in (None, "text"):
                raise ChatTemplateError(f"content part type {part.get('type')!r} is not supported by this model")
            texts.append(str(part.get("text", "")))
        else:
            texts.append(str(part))
    return "\n".join(texts)  # parts of one message are separate blocks of text, as llama.cpp's server joins them


def template_message(message: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI message as chat templates expect it: text content, tool-call arguments as objects."""
    out = dict(message, content=flatten_content(message.get("content")))
    calls = message.get("tool_calls")
    if calls:
        out["tool_calls"] = [dict(call, function=dict(call.get("function") or {},
                                                      arguments=_arguments(call.get("function") or {})))
                             for call in calls]
    return out


def _arguments(function: dict[str, Any]) -> Any:
    """OpenAI sends arguments as a JSON string; templates render them as an object (`| tojson`, `.items()`)."""
    raw = function.get("arguments", "{}")
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw or "{}")
    except json.JSONDecodeError:
        return raw
