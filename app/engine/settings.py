"""What the engine needs to know, built from the app's configuration in one place (`AppConfig.engine_settings`).

No defaults here: the configuration's are the only ones.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineSettings:
    path: str  # the local GGUF file
    model_id: str  # the name it is served under
    n_ctx: int
    n_batch: int
    n_threads: int  # resolved: never 0
    n_gpu_layers: int
    parallel: int
    max_queue: int
    embeddings: bool
    chat_format: str
    tool_format: str  # "auto" (from the template) or a family name (app.engine.toolcalls)
    reasoning_format: str  # "auto" (split <think> spans where the format has them) or "none"
    verbose: bool = False
