"""What the engine needs to know, built from the app's configuration in one place (`AppConfig.engine_settings`).

No defaults here: the configuration's are the only ones. The option vocabularies below are the engine's, checked
by the configuration and mapped to llama.cpp's enums by `app.engine.params`.
"""

from __future__ import annotations

from dataclasses import dataclass

FLASH_ATTN_MODES = ("auto", "on", "off")
SPLIT_MODES = ("none", "layer", "row")
MAX_DEVICES = 16  # llama.cpp's LLAMA_MAX_DEVICES: the length of its tensor_split array
ALL_MOE_LAYERS = 9999  # n_cpu_moe at or above this keeps every layer's experts on the CPU (--cpu-moe)


@dataclass(frozen=True)
class EngineSettings:
    path: str  # the local GGUF file
    model_id: str  # the name it is served under
    n_ctx: int  # 0 = auto: the model's trained context, capped by memory (app.engine.memory)
    n_batch: int
    n_threads: int  # resolved: never 0
    n_gpu_layers: int
    parallel: int
    max_queue: int
    embeddings: bool
    chat_format: str
    tool_format: str  # "auto" (from the template) or a family name (app.engine.toolcalls)
    reasoning_format: str  # "auto" (split <think> spans where the format has them) or "none"
    cache_type_k: str  # a key of app.engine.memory.CACHE_TYPE_BYTES
    cache_type_v: str
    flash_attn: str  # one of FLASH_ATTN_MODES
    split_mode: str  # one of SPLIT_MODES
    tensor_split: tuple[float, ...]  # a share per GPU; empty = llama.cpp's split by free memory
    main_gpu: int
    n_cpu_moe: int  # layers whose MoE expert weights stay in CPU memory; ALL_MOE_LAYERS = all
    repack_weights: bool = True  # llama.cpp's extra (repacked) CPU buffer types for the weights
    rpc_servers: tuple[str, ...] = ()  # llama.cpp RPC workers (host:port) registered as devices before the load
    verbose: bool = False
