"""Which output format (tool-call syntax, reasoning spans) to read the model's replies with.

Detected from the chat template as llama.cpp's common/chat does, unless `--tool-format` names a family;
`--reasoning-format none` keeps <think> spans in the content.
"""

from __future__ import annotations

import dataclasses
import logging

from app.engine.chat import ChatTemplate
from app.engine.toolcalls import ChatFormat, detect_format, format_named

log = logging.getLogger(__name__)


def choose_output_format(tool_format: str, reasoning_format: str, template: ChatTemplate) -> ChatFormat:
    if tool_format == "auto":
        fmt = detect_format(template.source)
        how = f"detected from the {'model' if template.name == 'model' else template.name} template"
    else:
        fmt = format_named(tool_format)
        how = "from --tool-format"
    if reasoning_format == "none" and fmt.reasoning:
        fmt = dataclasses.replace(fmt, reasoning=False)
    if fmt.supports_tools:
        log.info("tool calls: %s format (%s)%s", fmt.name, how, "; reasoning split out" if fmt.reasoning else "")
    else:
        log.info("tool calls are not parsed for this template (%s): requests with tools get a 400; "
                 "--tool-format names a family to parse%s", how, "; reasoning split out" if fmt.reasoning else "")
    return fmt
