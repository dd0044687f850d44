"""What a user needs to call this endpoint, and the task property labels, declared once.

The same `EndpointInfo` feeds the start-up log, the task's properties, the dashboard and the Model Endpoints
registration, so a label or a URL is never spelled twice.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

# Task properties the app writes about itself (a clone must not show its source's: see clearml.instances).
STATUS = "status"
IDLE_TIME = "idle time (s)"
LAST_ACTION = "last action"
GPU_OFFLOAD = "GPU offload"
TEST_PROMPT = "Write one sentence about the sea."


@dataclass(frozen=True)
class EndpointInfo:
    """The endpoint as the user sees it; field metadata holds each property's label."""

    app_url: str = dataclasses.field(default="", metadata={"label": "App URL"})
    api_base: str = dataclasses.field(default="", metadata={"label": "API base"})
    api_key: str = dataclasses.field(default="", metadata={"label": "API key"})
    test_command: str = dataclasses.field(default="", metadata={"label": "test command"})
    model: str = dataclasses.field(default="", metadata={"label": "model"})

    @classmethod
    def for_url(cls, app_url: str, api_key: str, model: str) -> EndpointInfo:
        """The endpoint served at `app_url` (no trailing slash), with a ready-to-paste test command."""
        base = f"{app_url}/v1"
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": TEST_PROMPT}],
                           "max_tokens": 32, "temperature": 0})
        test = (f"curl -s {base}/chat/completions -H 'Authorization: Bearer {api_key}' "
                f"-H 'Content-Type: application/json' -d '{body}'")
        return cls(app_url=app_url, api_base=base, api_key=api_key, test_command=test, model=model)

    def properties(self) -> dict[str, str]:
        """The task properties, by label."""
        return {f.metadata["label"]: getattr(self, f.name) for f in dataclasses.fields(self)}


def local_url(host: str, port: int, public_host: str) -> str:
    """The URL for a socket bound to `host`: `public_host` stands in for a wildcard bind, localhost for loopback."""
    shown = host
    if host in ("0.0.0.0", "::"):
        shown = public_host
    elif host == "127.0.0.1":
        shown = "localhost"
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


APP_PROPERTIES = (STATUS, IDLE_TIME, LAST_ACTION, GPU_OFFLOAD, *EndpointInfo().properties())
