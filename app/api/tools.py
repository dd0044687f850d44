"""Tools and reasoning for one chat request: what the template gets, what is forced, how the output is read.

The model family's output format comes from the engine (`engine.output_format`, detected from its template);
this module checks the request against it (a 400 rather than pretending) and shapes the plan the serving code
follows: the tools rendered into the prompt, a grammar when a call is forced, and the parser settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from app.api.errors import APIError, from_engine_error
from app.api.protocol import ChatCompletionRequest, NamedToolChoice
from app.engine.toolcalls import ChatFormat, forced_call_grammar
from app.engine.types import EngineError


@dataclass(frozen=True)
class OutputParsing:
    """How each choice's text is split into content, reasoning_content and tool_calls."""

    fmt: ChatFormat
    tools: bool  # parse tool calls (the request offered tools and did not say tool_choice none)
    reasoning: bool  # split reasoning spans
    opens_reasoning: bool = False  # the prompt already opened the reasoning span

    @property
    def active(self) -> bool:
        return self.tools or self.reasoning

    def format(self) -> ChatFormat:
        """The format to parse with: tool syntax only when tools were offered."""
        return self.fmt if self.tools else dataclasses.replace(self.fmt, supports_tools=False)


@dataclass(frozen=True)
class ToolPlan:
    tools: list[dict[str, Any]] | None  # for the template
    forced: str | None  # None: not forced; "": any tool (required); else that function's name
    parsing: OutputParsing


def plan_tools(fmt: ChatFormat, body: ChatCompletionRequest) -> ToolPlan:
    """Check tools, tool_choice and response_format against each other and the model's format."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    choice = body.tool_choice
    if choice is not None and not tools and choice != "none":
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise APIError(400, "tools: function names must be unique", param="tools")
    use_tools = bool(tools) and choice != "none"
    if use_tools and not fmt.supports_tools:
        raise APIError(400, "This model's chat template has no tool-call format this server can parse, so tools "
                            "cannot be offered; start the server with --tool-format (hermes, llama3, mistral, …) if "
                            "you know the model's syntax.", code="tools_not_supported", param="tools")
    forced: str | None = None
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools",
                           param="tool_choice")
        forced = choice.function.name
    elif choice == "required":
        forced = ""
    if forced is not None and body.response_format and body.response_format.get("type") not in (None, "text"):
        raise APIError(400, "a forced tool call cannot also follow response_format", param="response_format")
    parsing = OutputParsing(fmt, tools=use_tools, reasoning=fmt.reasoning)
    return ToolPlan(tools if use_tools else None, forced, parsing)


def forced_grammar(plan: ToolPlan, parallel: bool, opens_reasoning: bool) -> str | None:
    """The grammar that makes the model call a tool (any, or the named one), arguments valid by its schema."""
    if plan.forced is None or plan.tools is None:
        return None
    try:
        return forced_call_grammar(plan.parsing.fmt, plan.tools, plan.forced or None, parallel=parallel,
                                   prompt_opens_reasoning=opens_reasoning)
    except EngineError as exc:
        raise from_engine_error(exc) from None
