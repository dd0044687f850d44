"""Reasoning spans ("<think>...</think>") around a model's answer: where the prompt leaves one open,
and the GBNF that lets a constrained model finish one before it must call a tool.

Qwen3, QwQ and DeepSeek R1 templates may end the generation prompt inside `<think>`, so the
output starts in the middle of the reasoning; a grammar that forced a tool call from the first
token would put the call inside the reasoning, where no parser looks for it.
"""

from __future__ import annotations

import json


def prompt_opens_reasoning(prompt: str, markers: tuple[str, str]) -> bool:
    """True when the rendered prompt ends inside a reasoning span (its last open marker is unclosed)."""
    opening, closing = markers
    at = prompt.rfind(opening)
    if at < 0:
        return False
    tail = prompt[at + len(opening):]
    return closing not in tail and not tail.strip()


def gbnf_literal(text: str) -> str:
    """A GBNF string literal: JSON's escapes are GBNF's (\\n, \\", \\\\, \\uXXXX)."""
    return json.dumps(text, ensure_ascii=False)


def _class_escape(char: str) -> str:
    return "\\" + char if char in "]\\^-[" else json.dumps(char, ensure_ascii=False)[1:-1]


def until_marker_rules(name: str, marker: str) -> list[str]:
    """GBNF rules `name-0`.. matching any text that first contains `marker` at its end.

    A matcher for "text without the marker, then the marker": state k means the text so far
    ends with the marker's first k characters. Correct as long as the marker's first character
    does not recur in it (true of every marker used here), so a mismatch falls back to state 0,
    or to state 1 on that first character.
    """
    if not marker or marker[0] in marker[1:]:
        raise ValueError(f"marker {marker!r} needs a first character that does not recur")
    first = marker[0]
    rules = []
    for k, char in enumerate(marker):
        following = f"{name}-{k + 1}" if k + 1 < len(marker) else ""
        alternatives = [f"{gbnf_literal(char)} {following}".rstrip()]
        if k:
            alternatives.append(f"{gbnf_literal(first)} {name}-1")
            others = f"[^{_class_escape(char)}{_class_escape(first)}]"
        else:
            others = f"[^{_class_escape(first)}]"
        alternatives.append(f"{others} {name}-0")
        rules.append(f"{name}-{k} ::= " + " | ".join(alternatives))
    return rules
