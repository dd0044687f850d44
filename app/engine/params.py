"""llama.cpp's model and context parameters, built from EngineSettings in one place.

The model parameters point into C memory made here (the tensor_split array, the tensor buffer-type overrides
and their pattern strings): `ModelParams` keeps it alive until the model is loaded.
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp

from app.engine.memory import CACHE_TYPE_BYTES
from app.engine.settings import ALL_MOE_LAYERS, EngineSettings

GGML_BF16 = 30  # ggml.h's GGML_TYPE_BF16, which llama-cpp-python does not export (ggml_type_name(30) == "bf16")
GGML_TYPES = {name: int(getattr(llama_cpp, f"GGML_TYPE_{name.upper()}", GGML_BF16 if name == "bf16" else -1))
              for name in CACHE_TYPE_BYTES}
FLASH_ATTN_TYPES = {"auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}
SPLIT_MODES = {"none": llama_cpp.LLAMA_SPLIT_MODE_NONE, "layer": llama_cpp.LLAMA_SPLIT_MODE_LAYER,
               "row": llama_cpp.LLAMA_SPLIT_MODE_ROW}
# The MoE expert tensors, as llama.cpp's common/common.h names them (LLM_FFN_EXPS_REGEX): separate or fused
# gate/up, and chunked experts.
MOE_EXPERTS = r"\.ffn_(up|down|gate_up|gate)_(ch|)exps"
CPU_BUFFER_TYPE = "ggml_backend_cpu_buffer_type"


class TensorBuftOverride(ctypes.Structure):
    """llama.h's `struct llama_model_tensor_buft_override` (llama-cpp-python declares it only in a comment)."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def below(n: int) -> str:
    """A regex alternation matching the decimal numbers 0 .. n-1 (n >= 1) and nothing else, in a few branches:
    std::regex, which llama.cpp matches with, took 100 s on one alternative per number up to 9998."""

    def any_digits(count: int) -> str:
        return "" if count == 0 else "[0-9]" if count == 1 else f"[0-9]{{{count}}}"

    top = str(n - 1)
    branches = ["[0-9]"] if len(top) > 1 else []
    branches += ["[1-9]" + any_digits(width - 1) for width in range(2, len(top))]  # the shorter numbers
    for i, digit in enumerate(top):  # same length as n - 1: below its digit here, equal before
        low = 1 if i == 0 and len(top) > 1 else 0
        if int(digit) > low:
            branches.append(top[:i] + f"[{low}-{int(digit) - 1}]" + any_digits(len(top) - i - 1))
    branches.append(top)
    return "|".join(branches)


def cpu_moe_pattern(n_layers: int) -> str | None:
    """The tensor-name regex (searched, as llama.cpp does) for the expert weights of the first `n_layers` layers;
    every layer's at ALL_MOE_LAYERS; None for 0."""
    if n_layers <= 0:
        return None
    if n_layers >= ALL_MOE_LAYERS:
        return MOE_EXPERTS
    return r"blk\.(" + below(n_layers) + ")" + MOE_EXPERTS


def ggml_libraries() -> list[Path]:
    """The ggml shared libraries libllama runs with, the base library first.

    A wheel cannot hold symbolic links: libggml.so, libggml.so.0 and libggml.so.0.25.3 are three copies, and only
    the one loaded under its SONAME (libggml.so.0) is the one libllama uses. Another copy has registries of its
    own (a device registered there is invisible to llama.cpp), so the loaded files are read from /proc/self/maps,
    and where there is none the SONAME-like names (lib*.so.N) come first.
    """
    override = os.environ.get("LLAMA_CPP_LIB_PATH")  # llama_cpp loads libllama from here when set
    folder = Path(override) if override else Path(llama_cpp.__file__).resolve().parent / "lib"
    found: list[Path] = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            mapped = {line.split()[-1] for line in maps if "ggml" in line and "/" in line}
        found = [Path(p) for p in mapped if Path(p).parent.resolve() == folder.resolve()]
    except OSError:  # not Linux
        pass
    if not found:
        found = [p for p in folder.glob("*ggml*") if p.suffix in (".so", ".dylib", ".dll") or ".so." in p.name]
        found = [p for p in found if re.search(r"\.so\.\d+$", p.name)] or found  # the SONAME twins
    return sorted(found, key=lambda p: ("ggml-base" not in p.name, "ggml-cpu" not in p.name, p.name))


def cpu_buffer_type() -> int:
    """ggml's CPU buffer type (a pointer), which llama-cpp-python does not bind: from whichever ggml library
    exports it (libggml-base in 0.3.36)."""
    for path in ggml_libraries():
        lib = ctypes.CDLL(str(path))  # already loaded with libllama: this only looks the symbol up
        if hasattr(lib, CPU_BUFFER_TYPE):
            fn = getattr(lib, CPU_BUFFER_TYPE)
            fn.restype = ctypes.c_void_p
            fn.argtypes = []
            buft = fn()
            if buft:
                return int(buft)
    raise RuntimeError(f"n_cpu_moe: no ggml library beside llama_cpp exports {CPU_BUFFER_TYPE}")


@dataclass(frozen=True)
class ModelParams:
    """llama_model_params and the C memory they point into (alive as long as this object)."""

    params: Any  # llama_cpp.llama_model_params
    keep: tuple[object, ...]


def model_params(options: EngineSettings) -> ModelParams:
    """Offload and GPU placement: n_gpu_layers, split_mode, main_gpu, tensor_split, the CPU-resident experts."""
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = options.n_gpu_layers
    params.split_mode = SPLIT_MODES[options.split_mode]
    params.main_gpu = options.main_gpu
    params.use_extra_bufts = options.repack_weights
    keep: list[object] = []
    if options.tensor_split:
        # llama.cpp reads one share per device it has, up to llama_max_devices(): the rest must be zeros.
        shares = (ctypes.c_float * llama_cpp.llama_max_devices())(*options.tensor_split)
        params.tensor_split = ctypes.cast(shares, ctypes.POINTER(ctypes.c_float))
        keep.append(shares)
    pattern = cpu_moe_pattern(options.n_cpu_moe)
    if pattern is not None:
        text = ctypes.create_string_buffer(pattern.encode())
        overrides = (TensorBuftOverride * 2)()  # the second entry, all NULL, ends the list
        overrides[0].pattern = ctypes.cast(text, ctypes.c_char_p)
        overrides[0].buft = cpu_buffer_type()
        params.tensor_buft_overrides = ctypes.addressof(overrides)
        keep += [text, overrides]
    return ModelParams(params, tuple(keep))


def context_params(options: EngineSettings, n_ctx: int, n_batch: int) -> Any:
    """The generation context: one unified KV cache of `n_ctx` cells shared by `parallel` sequences."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = n_batch
    params.n_ubatch = n_batch
    params.n_seq_max = options.parallel
    params.n_threads = options.n_threads
    params.n_threads_batch = options.n_threads
    params.type_k = GGML_TYPES[options.cache_type_k]
    params.type_v = GGML_TYPES[options.cache_type_v]
    params.flash_attn_type = FLASH_ATTN_TYPES[options.flash_attn]
    params.kv_unified = True  # one cache: prefixes are shared between sequences by reference
    params.swa_full = True  # keep sliding-window layers whole so any cached prefix can be reused
    params.no_perf = True
    params.embeddings = False
    return params


def embedding_context_params(options: EngineSettings, n_ctx: int) -> Any:
    """The embedding-only context: one sequence, a whole input per batch, mean pooling, an f16 cache."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = n_ctx
    params.n_ubatch = n_ctx
    params.n_seq_max = 1
    params.n_threads = options.n_threads
    params.n_threads_batch = options.n_threads
    params.flash_attn_type = FLASH_ATTN_TYPES[options.flash_attn]
    params.embeddings = True
    params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
    params.no_perf = True
    return params
