"""Load a GGUF model and its contexts through llama-cpp-python's low-level API.

`LlamaModel` owns the C objects: the model, the generation context (one KV
cache shared by `parallel` sequences) and, if asked, an embedding context.
Between the two it sizes the context: the memory that will hold the KV cache
is read here (RAM, or VRAM through NVML) and `app.engine.memory` does the sums.
Only the scheduler thread calls into the contexts; tokenizing uses the
vocabulary alone and is safe from any thread.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from typing import Any

import llama_cpp
import psutil

from app.engine.memory import (
    ContextMemoryError,
    KVShape,
    MemoryBudget,
    choose_context,
    devices_used,
    head_dims,
    is_quantized,
)
from app.engine.params import context_params, embedding_context_params, model_params
from app.engine.settings import EngineSettings

log = logging.getLogger(__name__)

# The embedding context's compute buffer grows with the square of its size (measured on the demo model:
# 8.3 GiB reserved at 8,192 tokens; 36 GiB, refused, at 32,768): it stays at the size it had before contexts
# were sized automatically.
EMBED_MAX_CTX = 8192


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:  # an array or a float where a count was expected: fall back to n_embd / n_head
        return None


def available_ram() -> int:
    """Bytes of RAM that can be had without swapping (page cache included)."""
    return int(psutil.virtual_memory().available)


def free_vram() -> list[int] | None:
    """Free bytes of each GPU this process sees, in CUDA's order (CUDA_VISIBLE_DEVICES by index or UUID), from
    NVML; None when NVML cannot be read (no NVIDIA driver)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no library, no driver: the caller falls back to RAM
        return None
    try:
        count = pynvml.nvmlDeviceGetCount()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        names = [str(i) for i in range(count)] if visible is None else [v.strip() for v in visible.split(",")]
        free: list[int] = []
        for name in names:  # CUDA stops at the first entry it cannot resolve
            if name.isdigit():
                if int(name) >= count:
                    break
                handle = pynvml.nvmlDeviceGetHandleByIndex(int(name))
            else:
                try:
                    handle = pynvml.nvmlDeviceGetHandleByUUID(name)
                except pynvml.NVMLError:
                    break
            free.append(int(pynvml.nvmlDeviceGetMemoryInfo(handle).free))
        return free
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


def memory_budget(options: EngineSettings, reserved: int) -> MemoryBudget:
    """Where the KV cache will live, read after the model is loaded (its offloaded weights are already out of the
    free VRAM): the free VRAM of the GPUs holding the model when layers are offloaded on a GPU build, else the
    available RAM less the model file (mapped, so still counted as available). With a partial offload the whole
    cache is checked against VRAM; across GPUs free memory is summed, as a layer split spreads the cache."""
    if options.n_gpu_layers > 0 and llama_cpp.llama_supports_gpu_offload():
        free = free_vram()
        if free:
            used = devices_used(len(free), options.split_mode, options.main_gpu, options.tensor_split)
            if used:
                where = f"free VRAM on GPU {','.join(str(i) for i in used)}"
                return MemoryBudget(where, sum(free[i] for i in used), reserved=reserved)
        log.info("no NVML reading of the GPUs in use (not NVIDIA, or no driver): the context is sized by the "
                 "available RAM")
    return MemoryBudget("available RAM", available_ram(), weights=os.path.getsize(options.path), reserved=reserved)


def gpu_offload_problem(n_gpu_layers: int, gpus: int) -> str | None:
    """Why asked-for GPU layers would silently run on the CPU, or None: a GPU is here and layers are asked for,
    but this llama-cpp-python build cannot offload (a CPU-only wheel)."""
    if n_gpu_layers <= 0 or gpus <= 0 or llama_cpp.llama_supports_gpu_offload():
        return None
    return (f"{gpus} GPU(s) on this machine and {n_gpu_layers} GPU layers asked for, but this llama-cpp-python "
            "build cannot offload to a GPU: the model runs on the CPU. Build it with CMAKE_ARGS=-DGGML_CUDA=on "
            "(the gpu profile of app.instances does)")


class LlamaModel:
    """A loaded model with a batched generation context."""

    def __init__(self, options: EngineSettings) -> None:
        llama_cpp.llama_backend_init()  # idempotent: sets up ggml's timers and CPU backend
        self.options = options
        threads = options.n_threads
        self.devices: list[dict[str, Any]] = []  # with RPC workers: each device and the layers it holds
        placement = model_params(options)  # holds the C arrays the parameters point into until the load returns
        if options.rpc_servers:
            model = self._load_across_rpc(options, placement.params)
        else:
            model = llama_cpp.llama_model_load_from_file(options.path.encode("utf-8"), placement.params)
        del placement
        if not model:
            raise RuntimeError(f"llama.cpp could not load the model from {options.path}")
        self.model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(model)
        self.n_embd = llama_cpp.llama_model_n_embd(model)

        shape = self.kv_shape()
        embed_n_ctx = min(EMBED_MAX_CTX, max(512, self.n_ctx_train or 512))
        reserved = shape.cache_bytes(embed_n_ctx, "f16", "f16") if options.embeddings else 0
        try:
            choice = choose_context(options.n_ctx, self.n_ctx_train, shape, options.cache_type_k,
                                    options.cache_type_v, memory_budget(options, reserved))
        except ContextMemoryError:
            self.close()
            raise
        self.n_batch = min(options.n_batch, choice.n_ctx)  # llama.cpp caps its batch at the context
        ctx = llama_cpp.llama_init_from_model(model, context_params(options, choice.n_ctx, self.n_batch))
        if not ctx:
            self.close()
            hint = (" (a quantized V cache needs flash attention, which this backend may not support)"
                    if is_quantized(options.cache_type_v) else "")
            raise RuntimeError(f"llama.cpp could not create a context of {choice.n_ctx} tokens with a "
                               f"{options.cache_type_k}/{options.cache_type_v} cache{hint}")
        self.ctx = ctx
        self.n_ctx = llama_cpp.llama_n_ctx(ctx)
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.threads = threads
        log.info("%s", choice.describe())
        self.context_info: dict[str, Any] = {
            "n_ctx": int(self.n_ctx), "n_ctx_train": int(self.n_ctx_train), "reason": choice.reason,
            "type_k": options.cache_type_k, "type_v": options.cache_type_v, "flash_attn": options.flash_attn,
            "kv_bytes": choice.kv_bytes, "memory": choice.budget.describe()}

        self.embed_ctx: Any | None = None
        if options.embeddings:
            ectx = llama_cpp.llama_init_from_model(
                model, embedding_context_params(options, min(self.n_ctx, embed_n_ctx)))
            if not ectx:
                self.close()
                raise RuntimeError("llama.cpp could not create the embedding context")
            self.embed_ctx = ectx
            self.embed_n_ctx = llama_cpp.llama_n_ctx(ectx)

        self._piece_buf = ctypes.create_string_buffer(256)
        self._lock = threading.Lock()  # guards the shared piece buffer for cross-thread tokenizer use

    def _load_across_rpc(self, options: EngineSettings, params: Any) -> Any:
        """Register the RPC workers as llama.cpp devices, load, and note how many layers each device got."""
        from app.engine import rpc

        workers = rpc.add_servers(list(options.rpc_servers))
        if options.n_gpu_layers == 0:
            log.warning("RPC servers are set but Number of GPU Layers is 0: no layer goes to the workers (9999 = "
                        "all layers, split across them)")
        for device in workers:
            log.info("RPC device %s (%s): %d of %d MiB free", device.name, device.description,
                     device.free // 2**20, device.total // 2**20)
        with rpc.layer_placement() as counts:
            model = llama_cpp.llama_model_load_from_file(options.path.encode("utf-8"), params)
        by_name = {d.name: d for d in rpc.devices()}
        for name, layers in sorted(counts.items(), key=lambda item: (not item[0].startswith("RPC"), item[0])):
            known = by_name.get(name)
            self.devices.append({"device": name, "description": known.description if known else "",
                                 "layers": layers, "free_mib": known.free // 2**20 if known else None})
        log.info("layers per device: %s", ", ".join(f"{d['device']} ({d['description']}): {d['layers']}"
                                                    for d in self.devices) or "none reported")
        return model

    def kv_shape(self) -> KVShape:
        """What the KV cache holds per token, from the model itself."""
        arch = self.meta("general.architecture") or ""
        n_head = llama_cpp.llama_model_n_head(self.model)
        dim_k, dim_v = head_dims(self.n_embd, n_head, _int_or_none(self.meta(f"{arch}.attention.key_length")),
                                 _int_or_none(self.meta(f"{arch}.attention.value_length")))
        return KVShape(n_layer=llama_cpp.llama_model_n_layer(self.model),
                       n_head_kv=llama_cpp.llama_model_n_head_kv(self.model), head_dim_k=dim_k, head_dim_v=dim_v)

    # --- metadata ----------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(65536)
        n = llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def chat_template(self) -> str | None:
        return self.meta("tokenizer.chat_template")

    # --- tokens -----------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        with self._lock:
            n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece_buf, 256, 0, special)
            if n < 0:
                big = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, big, -n, 0, special)
                return big.raw[:n]
            return self._piece_buf.raw[:n]

    def detokenize(self, tokens: list[int], special: bool = False) -> str:
        return b"".join(self.token_bytes(t, special) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def token_text(self, token: int) -> str:
        return self.token_bytes(token, special=True).decode("utf-8", errors="replace")

    def bos_text(self) -> str:
        tok = llama_cpp.llama_vocab_bos(self.vocab)
        return self.token_text(tok) if tok >= 0 else ""

    def eos_text(self) -> str:
        tok = llama_cpp.llama_vocab_eos(self.vocab)
        return self.token_text(tok) if tok >= 0 else ""

    def describe(self) -> dict[str, Any]:
        desc = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.model, desc, len(desc))
        return {
            "description": desc.value.decode(errors="replace"),
            "n_params": int(llama_cpp.llama_model_n_params(self.model)),
            "size_bytes": int(llama_cpp.llama_model_size(self.model)),
            "n_ctx_train": int(self.n_ctx_train),
            "n_ctx": int(self.n_ctx),
            "n_vocab": int(self.n_vocab),
            "threads": self.threads,
        }

    def close(self) -> None:
        if getattr(self, "embed_ctx", None):
            llama_cpp.llama_free(self.embed_ctx)
            self.embed_ctx = None
        if getattr(self, "ctx", None):
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            llama_cpp.llama_model_free(self.model)
            self.model = None
