"""Load a GGUF model and its contexts through llama-cpp-python's low-level API.

`LlamaModel` owns the C objects: the model, the generation context (one KV
cache shared by `parallel` sequences) and, if asked, an embedding context.
Only the scheduler thread calls into the contexts; tokenizing uses the
vocabulary alone and is safe from any thread.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from typing import Any

import llama_cpp

from app.engine.settings import EngineSettings

log = logging.getLogger(__name__)


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
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = options.n_gpu_layers
        model = llama_cpp.llama_model_load_from_file(options.path.encode("utf-8"), mparams)
        if not model:
            raise RuntimeError(f"llama.cpp could not load the model from {options.path}")
        self.model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(model)

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = options.n_ctx
        cparams.n_batch = options.n_batch
        cparams.n_ubatch = options.n_batch
        cparams.n_seq_max = options.parallel
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.kv_unified = True  # one cache: prefixes are shared between sequences by reference
        cparams.swa_full = True  # keep sliding-window layers whole so any cached prefix can be reused
        cparams.no_perf = True
        cparams.embeddings = False
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise RuntimeError("llama.cpp could not create a context (n_ctx too large for memory?)")
        self.ctx = ctx
        self.n_ctx = llama_cpp.llama_n_ctx(ctx)
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.threads = threads

        self.embed_ctx: Any | None = None
        self.n_embd = llama_cpp.llama_model_n_embd(model)
        if options.embeddings:
            eparams = llama_cpp.llama_context_default_params()
            eparams.n_ctx = min(options.n_ctx, max(512, self.n_ctx_train or 512))
            eparams.n_batch = eparams.n_ctx
            eparams.n_ubatch = eparams.n_ctx
            eparams.n_seq_max = 1
            eparams.n_threads = threads
            eparams.n_threads_batch = threads
            eparams.embeddings = True
            eparams.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
            eparams.no_perf = True
            ectx = llama_cpp.llama_init_from_model(model, eparams)
            if not ectx:
                self.close()
                raise RuntimeError("llama.cpp could not create the embedding context")
            self.embed_ctx = ectx
            self.embed_n_ctx = llama_cpp.llama_n_ctx(ectx)

        self._piece_buf = ctypes.create_string_buffer(256)
        self._lock = threading.Lock()  # guards the shared piece buffer for cross-thread tokenizer use

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
