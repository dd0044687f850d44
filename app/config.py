"""The app's configuration: every field declared once.

`AppConfig` is the single source of truth for the CLI flags, the JSON config
file (`--config`, `configs/*.json`) and the ClearML hyperparameter sections.
Each field carries its form section, its label and its description in
`json_schema_extra`, so `--help`, the task's hyperparameters and the README
table all say the same thing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from app.engine.chat import CHAT_FORMATS
from app.engine.memory import CACHE_TYPE_BYTES, MAX_N_CTX, is_quantized
from app.engine.settings import ALL_MOE_LAYERS, FLASH_ATTN_MODES, MAX_DEVICES, SPLIT_MODES, EngineSettings
from app.model_source import ModelSourceError, ModelSpec, parse_spec

GENERAL = "General"
ADVANCED = "Advanced Options"
SECTIONS = (GENERAL, ADVANCED)

FORMAT_VERSION = 1
MASK = "***"  # how exports show secrets; importing it means "not given"

# 9999 is the launch form's "all layers" value, kept as llama.cpp understands it.
ALL_GPU_LAYERS = 9999

# Bounds. llama.cpp's own limits were measured by loading the demo model with llama-cpp-python 0.3.36
# (app.engine.model.LlamaModel in a child process); the others are this app's choices, reasons given.
LLAMA_MAX_SEQUENCES = 256  # n_seq_max 257: "n_seq_max must be <= 256"
MIN_N_CTX = 64  # a chat template, a short prompt and a short reply; llama.cpp itself has no minimum
MAX_N_BATCH = 8192  # n_ubatch = n_batch: the compute buffer grows with n_batch x n_ctx (8 GiB at 8192 x 8192)
MAX_THREADS = 1024  # absolute; the machine check below is tighter
THREADS_PER_CORE = 4  # past the cores each thread only spins: 64 threads on 2 cores decode 8x slower
MAX_BODY_BYTES = 8 * 1024 * 1024  # the largest request body the API reads (413 beyond; the body deadline's size)
MAX_QUEUE = 4096  # waiting requests each hold a connection; 16 full waves of 256 sequences
MAX_IDLE_HOURS = 8760.0  # a year; 0 already means "never"
MIN_REPORT_INTERVAL_S = 1.0  # each report samples the machine and calls ClearML: at 1 ms an idle app used 90% of a core
MAX_REPORT_INTERVAL_S = 3600.0  # the dashboard shows the last hour: at least one point in it
# Fields that take one of a few names (compared lowercased).
CHOICES = {"cache_type_k": tuple(CACHE_TYPE_BYTES), "cache_type_v": tuple(CACHE_TYPE_BYTES),
           "flash_attn": FLASH_ATTN_MODES, "split_mode": SPLIT_MODES}
CORS_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s,]+/?", re.IGNORECASE)  # scheme://host[:port]


class ConfigError(ValueError):
    """A configuration value is wrong; the message is one line naming the field."""


def _field(default: Any, section: str, label: str, description: str, secret: bool = False, **kw: Any) -> Any:
    extra: Any = {"section": section, "label": label, "secret": secret}
    return Field(default, description=description, json_schema_extra=extra, **kw)


class AppConfig(BaseModel):
    """Everything a deployment needs to know; defaults are the launch form's."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- General ---------------------------------------------------------
    model: str = _field(
        "", GENERAL, "Model",
        "GGUF model to serve: a ClearML model ID, a Hugging Face path owner/repo/path/to/model.gguf, "
        "a local path, a file:// or http(s)/s3 URL, or 'demo' for the bundled Gemma 3 270M.",
    )
    hf_token: str = _field(
        "", GENERAL, "Hugging Face Token",
        "Token for gated or private Hugging Face repositories; when empty, HF_TOKEN from the environment. "
        "Never logged or exported.", secret=True,
    )
    n_gpu_layers: int = _field(
        ALL_GPU_LAYERS, GENERAL, "Number of GPU Layers",
        "Layers to offload to the GPU; 9999 = all, 0 = CPU only. Ignored on a CPU-only build.",
        ge=0, le=ALL_GPU_LAYERS,
    )

    # --- Advanced Options --------------------------------------------------
    idle_time_limit_hours: float = _field(
        1.0, ADVANCED, "Idle Time Limit (Hours)",
        "Stop the app after this long without a request (fractions allowed); 0 = never; at most 8760 (a year).",
        ge=0, le=MAX_IDLE_HOURS,
    )
    last_action_report_interval_sec: float = _field(
        30.0, ADVANCED, "Last Action Report Interval (Seconds)",
        "How often the last action time, status and metrics are reported to the task; 1 to 3600.",
        ge=MIN_REPORT_INTERVAL_S, le=MAX_REPORT_INTERVAL_S,
    )
    api_key: str = _field(
        "", ADVANCED, "API Key",
        "Key clients send as 'Authorization: Bearer KEY' or 'X-Api-Key'; generated when empty.", secret=True,
    )
    host: str = _field(
        "127.0.0.1", ADVANCED, "Host",
        "Address to bind; 0.0.0.0 for all interfaces.",
    )
    port: int = _field(8080, ADVANCED, "Port", "TCP port to listen on; 0 picks a free port.", ge=0, le=65535)
    static_route: str = _field(
        "", ADVANCED, "Gateway Static Route",
        "Under an agent on a server with the AI Application Gateway: a load-balanced route name shared by replicas; "
        "empty = a route of its own.",
    )
    cors_origins: str = _field(
        "*", ADVANCED, "CORS Allowed Origins",
        "Web origins whose browser pages may call the API: '*' = any (no cookies are involved: the key travels in a "
        "header), a comma-separated list such as https://app.example.com, or 'none' to switch CORS off.",
    )
    n_ctx: int = _field(
        0, ADVANCED, "Context Size",
        "Context (KV cache) in tokens, shared by the parallel sequences; one request may use all of it. 0 = auto: "
        "the model's trained context, capped by the memory that will hold the cache (free VRAM of the GPUs used "
        "when layers are offloaded, else available RAM less the model) minus max(512 MiB, 10%), rounded down to "
        "a multiple of 256. A size whose cache does not fit is refused at load, naming the size that would. "
        "0 or 64 to 1048576.",
        ge=0, le=MAX_N_CTX,
    )
    cache_type_k: str = _field(
        "f16", ADVANCED, "KV Cache Type K",
        "Type of the cached keys: f16, f32, bf16, or a quantized q8_0 (about half of f16's memory), q5_1, q5_0, "
        "q4_1, q4_0, iq4_nl (about a quarter, with a quality cost).",
    )
    cache_type_v: str = _field(
        "f16", ADVANCED, "KV Cache Type V",
        "Type of the cached values, as for cache_type_k; a quantized V cache needs flash attention (flash_attn "
        "auto or on).",
    )
    flash_attn: str = _field(
        "auto", ADVANCED, "Flash Attention",
        "auto (llama.cpp uses it where the backend supports it), on or off.",
    )
    n_threads: int = _field(
        0, ADVANCED, "Threads",
        "CPU threads for generation; 0 = all cores; at most 4 per core of the machine that serves.",
        ge=0, le=MAX_THREADS,
    )
    n_batch: int = _field(
        512, ADVANCED, "Batch Size",
        "Most tokens given to one llama_decode call; at least parallel, at most 8192 and n_ctx (with n_ctx 0, "
        "capped at the chosen context).",
        ge=1, le=MAX_N_BATCH,
    )
    parallel: int = _field(
        4, ADVANCED, "Parallel Sequences",
        "Requests decoded together; the queue holds the rest; 1 to 256. 4 by default because on a CPU every "
        "stream slows the others (2 cores, small model: 78 tok/s alone, about 32 each of 4, 22 each of 8); "
        "raise it on a GPU, where more streams cost little.",
        ge=1, le=LLAMA_MAX_SEQUENCES,
    )
    max_queue: int = _field(
        64, ADVANCED, "Max Queue", "Requests that may wait for a free sequence; beyond that: 429; 0 to 4096.",
        ge=0, le=MAX_QUEUE,
    )
    split_mode: str = _field(
        "layer", ADVANCED, "GPU Split Mode",
        "How the model is spread over several GPUs: layer (whole layers and their cache per GPU), row (each "
        "tensor split by rows; needs fast links between GPUs) or none (main_gpu only).",
    )
    tensor_split: str = _field(
        "", ADVANCED, "GPU Tensor Split",
        "Share of the model per GPU as comma-separated non-negative numbers, e.g. 3,1 (at most 16); empty = in "
        "proportion to each GPU's free memory.",
    )
    main_gpu: int = _field(
        0, ADVANCED, "Main GPU",
        "The GPU (index among the visible ones) that holds the whole model with split_mode none; 0 to 15.",
        ge=0, le=MAX_DEVICES - 1,
    )
    n_cpu_moe: int = _field(
        0, ADVANCED, "CPU MoE Layers",
        "Keep the MoE expert weights of the first N layers in CPU memory (llama.cpp's --n-cpu-moe), freeing VRAM "
        "for attention, more layers and context; 9999 = every layer (--cpu-moe); 0 = off; no effect on models "
        "without experts.",
        ge=0, le=ALL_MOE_LAYERS,
    )
    embeddings: bool = _field(False, ADVANCED, "Embeddings", "Serve /v1/embeddings.")
    repack_weights: bool = _field(
        True, ADVANCED, "Weight Repacking",
        "Repack quantized weights in CPU memory for this CPU's fastest kernels (llama.cpp's default; its --no-repack "
        "turns it off). Layers on RPC workers are not repacked, so a single process with this off computes exactly "
        "what an RPC deployment computes.",
    )
    rpc_servers: str = _field(
        "", ADVANCED, "RPC Servers",
        "llama.cpp RPC workers (python -m app.rpc_worker) as comma-separated host:port on a private network: the "
        "model's offloaded layers (Number of GPU Layers) are split across them by free memory; empty = none. Needs "
        "a build with RPC (make install builds one).",
    )
    rpc_worker_tasks: str = _field(
        "", ADVANCED, "RPC Worker Tasks",
        "ClearML task IDs of RPC workers (set by app.instances launch --rpc-workers): at start the app waits for "
        "each to publish its endpoint and adds it to RPC Servers.",
    )
    chat_format: str = _field(
        "auto", ADVANCED, "Chat Format",
        "Chat template: 'auto' uses the model's own and falls back to ChatML; or chatml, gemma, llama3.",
    )
    model_alias: str = _field(
        "", ADVANCED, "Model Alias", "Name the model is served under; the file name when empty.",
    )
    tool_format: str = _field(
        "auto", ADVANCED, "Tool Call Format",
        "How tool calls are read from the model's output: 'auto' detects the family from the chat template; "
        "or hermes, llama3, mistral, deepseek_r1, plain (no tool calls).",
    )
    reasoning_format: str = _field(
        "auto", ADVANCED, "Reasoning Format",
        "'auto' returns <think> spans of reasoning models as reasoning_content; 'none' leaves them in content.",
    )

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: str) -> str:
        value = value.strip()
        if value in ("*", "none", ""):
            return value or "none"
        for origin in (o.strip() for o in value.split(",")):
            if not CORS_ORIGIN.fullmatch(origin):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], no path); "
                                 "or use '*' or 'none'")
        return value

    @field_validator("n_ctx")
    @classmethod
    def _auto_or_roomy(cls, value: int) -> int:
        if 0 < value < MIN_N_CTX:
            raise ValueError(f"must be 0 (auto) or at least {MIN_N_CTX}")
        return value

    @field_validator(*CHOICES)
    @classmethod
    def _one_of(cls, value: str, info: ValidationInfo) -> str:
        value = value.strip().lower()
        choices = CHOICES[str(info.field_name)]
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value

    @field_validator("tensor_split")
    @classmethod
    def _shares(cls, value: str) -> str:
        items = [item.strip() for item in value.split(",")] if value.strip() else []
        shares = []
        for item in items:
            try:
                share = float(item)
            except ValueError:
                raise ValueError(f"{item!r} is not a number: give comma-separated shares such as 3,1") from None
            if not 0 <= share < float("inf"):
                raise ValueError(f"{item!r} is not a non-negative share")
            shares.append(share)
        if len(shares) > MAX_DEVICES:
            raise ValueError(f"{len(shares)} shares for at most {MAX_DEVICES} GPUs")
        if shares and not any(shares):
            raise ValueError("at least one share must be positive; leave it empty to split by free memory")
        return ",".join(items)

    @field_validator("rpc_servers")
    @classmethod
    def _endpoints(cls, value: str) -> str:
        from app.engine.rpc_endpoints import parse_endpoints

        return ",".join(parse_endpoints(value))

    @field_validator("rpc_worker_tasks")
    @classmethod
    def _task_ids(cls, value: str) -> str:
        ids = [v.strip() for v in value.split(",") if v.strip()]
        for task_id in ids:
            if not re.fullmatch(r"[A-Za-z0-9_-]+", task_id):
                raise ValueError(f"{task_id!r} is not a ClearML task ID")
        return ",".join(ids)

    @field_validator("reasoning_format")
    @classmethod
    def _known_reasoning_format(cls, value: str) -> str:
        if value not in ("auto", "none"):
            raise ValueError("must be 'auto' or 'none'")
        return value

    @field_validator("tool_format")
    @classmethod
    def _known_tool_format(cls, value: str) -> str:
        from app.engine.toolcalls import format_named

        if value != "auto":
            try:
                format_named(value)
            except ValueError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("chat_format")
    @classmethod
    def _known_chat_format(cls, value: str) -> str:
        if value != "auto" and value not in CHAT_FORMATS:
            raise ValueError(f"must be 'auto' or one of {', '.join(sorted(CHAT_FORMATS))}")
        return value

    @model_validator(mode="after")
    def _fits_llama_cpp(self) -> AppConfig:
        """Combinations llama.cpp aborts on (measured) or refuses, refused before anything loads."""
        if self.n_ctx and self.n_batch > self.n_ctx:
            # llama.cpp cuts its batch to n_ctx while the scheduler fills n_batch: GGML_ASSERT at the first long decode.
            raise ValueError(f"n_batch ({self.n_batch}) must not exceed n_ctx ({self.n_ctx}): "
                             "llama.cpp caps its batch at the context; lower n_batch")
        if self.n_batch < self.parallel:
            # Each step decodes one token of every sequence in one batch: GGML_ASSERT(n_outputs_max ...) at load.
            raise ValueError(f"n_batch ({self.n_batch}) must be at least parallel ({self.parallel}): "
                             "each step decodes one token of every sequence together")
        if is_quantized(self.cache_type_v) and self.flash_attn == "off":
            # llama.cpp refuses to create the context: "V cache quantization requires flash_attn".
            raise ValueError(f"cache_type_v {self.cache_type_v} needs flash attention: set flash_attn to auto or "
                             "on, or cache_type_v to f16")
        return self

    # --- views ---------------------------------------------------------------

    def engine_settings(self, path: str, model_id: str, verbose: bool = False) -> EngineSettings:
        """The engine's settings: these fields, the fetched file, the served name, threads resolved."""
        return EngineSettings(
            path=path, model_id=model_id, n_ctx=self.n_ctx, n_batch=self.n_batch,
            n_threads=self.n_threads or usable_cores(), n_gpu_layers=self.n_gpu_layers, parallel=self.parallel,
            max_queue=self.max_queue, embeddings=self.embeddings, chat_format=self.chat_format,
            tool_format=self.tool_format, reasoning_format=self.reasoning_format, cache_type_k=self.cache_type_k,
            cache_type_v=self.cache_type_v, flash_attn=self.flash_attn, split_mode=self.split_mode,
            tensor_split=self.tensor_shares(), main_gpu=self.main_gpu, n_cpu_moe=self.n_cpu_moe,
            repack_weights=self.repack_weights, rpc_servers=tuple(s for s in self.rpc_servers.split(",") if s),
            verbose=verbose)

    def tensor_shares(self) -> tuple[float, ...]:
        """tensor_split as numbers; empty when not given."""
        return tuple(float(item) for item in self.tensor_split.split(",")) if self.tensor_split else ()

    def model_spec(self) -> ModelSpec:
        """The model spec, parsed (raises ModelSourceError with one line when it names nothing fetchable)."""
        return parse_spec(self.model)

    def allowed_origins(self) -> tuple[str, ...]:
        """The CORS origins; empty when CORS is off."""
        if self.cors_origins == "none":
            return ()
        return tuple(o.strip().rstrip("/") for o in self.cors_origins.split(","))

    @property
    def served_name(self) -> str:
        """The name clients use for the model: the alias, else the file name."""
        return self.model_alias or self.model_spec().alias

    def masked(self) -> dict[str, Any]:
        """The configuration with secrets hidden, for logs and exports."""
        out = self.model_dump()
        for name in secret_fields():
            if out[name]:
                out[name] = MASK
        return out



def _extra(name: str) -> dict[str, Any]:
    extra = AppConfig.model_fields[name].json_schema_extra
    assert isinstance(extra, dict)  # declared by _field for every field
    return extra


def field_names() -> list[str]:
    return list(AppConfig.model_fields)


def field_section(name: str) -> str:
    return str(_extra(name)["section"])


def field_label(name: str) -> str:
    return str(_extra(name)["label"])


def field_description(name: str) -> str:
    return AppConfig.model_fields[name].description or ""


def secret_fields() -> list[str]:
    return [n for n in AppConfig.model_fields if _extra(n)["secret"]]


def iter_fields() -> Iterator[tuple[str, str, str, Any, str]]:
    """(name, section, type name, default, description) for each field, for docs."""
    for name, info in AppConfig.model_fields.items():
        type_name = getattr(info.annotation, "__name__", str(info.annotation))
        yield name, field_section(name), type_name, info.default, field_description(name)


def describe_error(exc: ValidationError) -> str:
    """One line naming each offending field."""
    parts = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:
            # A check across fields names them itself; its input is every value, secrets included.
            parts.append(msg)
            continue
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        got = "" if err["type"] == "extra_forbidden" else f" (got {err.get('input')!r})"
        parts.append(f"{loc}: {msg}{got}")
    return "invalid configuration: " + "; ".join(parts)


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask, which containers narrow), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def check_runnable(config: AppConfig, cores: int | None = None) -> None:
    """What only the machine about to serve can check, before it binds a port or loads anything.

    Kept out of AppConfig's own validation: exports, launches and the README table
    build configurations without a model, and on machines other than the one that serves.
    """
    try:
        parse_spec(config.model)
    except ModelSourceError as exc:
        raise ConfigError(f"invalid configuration: model: {exc}") from None
    if config.rpc_servers or config.rpc_worker_tasks:
        from app.engine.rpc_endpoints import BUILD_HINT, build_supports_rpc

        if not build_supports_rpc():
            raise ConfigError(f"invalid configuration: rpc_servers: {BUILD_HINT}")
    cores = cores or usable_cores()
    limit = THREADS_PER_CORE * cores
    if config.n_threads > limit:
        raise ConfigError(f"invalid configuration: n_threads: {config.n_threads} is more than {THREADS_PER_CORE} "
                          f"per usable core ({cores} cores: at most {limit}); 0 uses all cores")


def read_secret_file(path: str, flag: str) -> str:
    """A secret kept in a file (off the process list): its text without surrounding whitespace."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{flag}: file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{flag}: {path} is not UTF-8 text") from None
    secret = text.strip()
    if not secret:
        raise ConfigError(f"{flag}: {path} is empty")
    return secret


def build(values: dict[str, Any]) -> AppConfig:
    """Validate merged values into an AppConfig, or raise ConfigError with one line."""
    try:
        return AppConfig(**values)
    except ValidationError as exc:
        raise ConfigError(describe_error(exc)) from None


def load_json(path: str | Path) -> dict[str, Any]:
    """Read a config file: either flat fields or the sectioned export format."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file {path} is not readable JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    return flatten_document(raw, source=str(path))


def flatten_document(raw: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Accept `{"format_version": 1, "General": {...}, "Advanced Options": {...}}` or flat fields."""
    version = raw.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ConfigError(f"{source}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "format_version":
            continue
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: section {key!r} must be an object")
            for name, inner in value.items():
                if name in AppConfig.model_fields and field_section(name) != key:
                    raise ConfigError(f"{source}: field {name!r} belongs to section {field_section(name)!r}")
                flat[name] = inner
        else:
            flat[key] = value
    for name in secret_fields():
        if flat.get(name) == MASK:
            del flat[name]  # a masked export: the secret was not exported, so it is not set
    return flat


def to_document(config: AppConfig, include_secrets: bool = False) -> dict[str, Any]:
    """The versioned JSON document used by configs/*.json, --config and exports."""
    values = config.model_dump() if include_secrets else config.masked()
    doc: dict[str, Any] = {"format_version": FORMAT_VERSION}
    for section in SECTIONS:
        doc[section] = {n: values[n] for n in AppConfig.model_fields if field_section(n) == section}
    return doc


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field; defaults are suppressed so only given flags override."""
    for name, info in AppConfig.model_fields.items():
        help_text = (f"[{field_section(name)}: {field_label(name)}] {field_description(name)} "
                     f"(default: {info.default!r})").replace("%", "%%")  # argparse formats help with %
        if info.annotation is bool:
            parser.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(_flag(name), dest=name, default=argparse.SUPPRESS, help=help_text,
                                metavar=name.upper())


def cli_values(ns: argparse.Namespace) -> dict[str, Any]:
    """The field values given on the command line (strings; pydantic casts them)."""
    return {n: getattr(ns, n) for n in AppConfig.model_fields if hasattr(ns, n)}


def from_strings(sections: dict[str, Any]) -> dict[str, Any]:
    """Values as ClearML hands them back (`Section/name` -> string) to typed-ready field values.

    Empty strings for non-string fields mean "use the default" as the web UI
    leaves them; unknown keys are reported, not silently dropped.
    """
    flat: dict[str, Any] = {}
    for key, value in sections.items():
        section, _, name = key.partition("/")
        if section not in SECTIONS:
            continue
        if name not in AppConfig.model_fields:
            raise ConfigError(f"unknown hyperparameter {key!r}")
        annotation = AppConfig.model_fields[name].annotation
        if isinstance(value, str) and annotation is not str:
            text = value.strip()
            if text == "":
                continue
            if annotation is bool:
                lowered = text.lower()
                if lowered in ("true", "1", "yes", "on"):
                    value = True
                elif lowered in ("false", "0", "no", "off"):
                    value = False
                else:
                    raise ConfigError(f"invalid configuration: {name}: expected true or false (got {value!r})")
            else:
                value = text
        flat[name] = value
    return flat
