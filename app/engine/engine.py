"""The engine facade the HTTP layer talks to: load, prompt building, submit, embed, close."""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import math
from typing import Any

import llama_cpp

from app.engine.chat import ChatTemplate, select_template, template_message
from app.engine.formats import choose_output_format
from app.engine.model import LlamaModel
from app.engine.reasoning import prompt_opens_reasoning
from app.engine.sampling import SamplerChain
from app.engine.scheduler import Scheduler
from app.engine.settings import EngineSettings
from app.engine.types import (
    ChatPrompt,
    ContextLengthError,
    EngineError,
    EngineUnavailableError,
    GenerationRequest,
    InvalidRequestError,
    RequestHandle,
    ShuttingDownError,
)

log = logging.getLogger(__name__)


class LlamaEngine:
    """The real engine: a loaded model behind a continuous-batching scheduler."""

    def __init__(self, options: EngineSettings) -> None:
        logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if options.verbose else logging.ERROR)
        self.model = LlamaModel(options)
        self.model_id = options.model_id
        self.parallel = options.parallel
        self.embeddings_enabled = options.embeddings
        self.template: ChatTemplate = select_template(
            options.chat_format, self.model.chat_template(), self.model.bos_text(), self.model.eos_text())
        self.output_format = choose_output_format(options.tool_format, options.reasoning_format, self.template)
        # The model's batch: capped at the context when the context was chosen at load (n_ctx 0).
        self.scheduler = Scheduler(self.model, options.parallel, options.max_queue, self.model.n_batch)
        self.n_ctx = self.scheduler.n_ctx
        self.n_ctx_seq = self.scheduler.n_ctx_seq
        self.capacity = self.scheduler.capacity
        self.scheduler.start()

    # --- prompts ----------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    template_kwargs: dict[str, Any] | None = None) -> ChatPrompt:
        """Render and tokenize a chat (with its tools and template options); returns tokens, the template's
        stop strings and whether the prompt leaves the model inside a reasoning span."""
        flat = [template_message(m) for m in messages]
        text = self.template.render(flat, add_generation_prompt=True, tools=tools, kwargs=template_kwargs)
        # The template writes BOS itself when the model wants it; parse its special tokens.
        tokens = self.model.tokenize(text, add_special=False, parse_special=True)
        if self.template.bos_token and not text.startswith(self.template.bos_token) and \
                llama_cpp.llama_vocab_get_add_bos(self.model.vocab):
            tokens = [llama_cpp.llama_vocab_bos(self.model.vocab)] + tokens
        opens = self.output_format.reasoning and prompt_opens_reasoning(text, self.output_format.reasoning_markers)
        return ChatPrompt(tokens, list(self.template.stop), opens_reasoning=opens)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self.model.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.model.detokenize(tokens)

    def token_piece(self, token: int) -> str:
        return self.model.token_bytes(token).decode("utf-8", errors="replace")

    def valid_token(self, token: int) -> bool:
        return 0 <= token < self.model.n_vocab

    # --- generation ------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> RequestHandle:
        """Build (and so validate) the request's sampler here, so a bad request fails alone, then queue it.

        Compiling a grammar may take a while: callers with one call this from a worker thread.
        """
        try:
            sampler = SamplerChain(self.model.vocab, self.model.n_vocab, request.sampling)
        except EngineError:
            raise
        except Exception as exc:  # whatever llama.cpp or the encoder makes of it, it is this request's fault
            param = "response_format" if request.sampling.grammar else None
            raise InvalidRequestError(f"the sampling parameters cannot be used: {exc}", param=param) from None
        try:
            return self.scheduler.submit(request, loop, sampler)
        except BaseException:
            sampler.close()
            raise

    def abort(self, message: str) -> None:
        """End every running and queued request with a 503 (the end of a drain)."""
        self.scheduler.abort(ShuttingDownError(message))

    @property
    def queue_depth(self) -> int:
        return self.scheduler.queue_depth

    @property
    def active(self) -> int:
        return self.scheduler.active

    @property
    def kv_cells_used(self) -> int:
        return self.scheduler.cells.used

    @property
    def preemptions(self) -> int:
        return self.scheduler.preemptions

    def context_info(self) -> dict[str, Any]:
        """The effective context for clients sizing their prompts: cells, the most one request may use, the
        model's trained context and the KV cache's types."""
        chosen = self.model.context_info
        return {"n_ctx": self.n_ctx, "max_request_tokens": self.n_ctx_seq,
                "n_ctx_train": int(self.model.n_ctx_train), "kv_cache_type_k": chosen["type_k"],
                "kv_cache_type_v": chosen["type_v"], "flash_attn": chosen["flash_attn"],
                "kv_cells_used": self.kv_cells_used,
                **({"devices": self.model.devices} if self.model.devices else {})}

    # --- embeddings ------------------------------------------------------------------------

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        if self.model.embed_ctx is None:
            raise EngineUnavailableError("embeddings are not enabled")
        for tokens in inputs:
            if len(tokens) > self.model.embed_n_ctx:
                raise ContextLengthError(
                    f"an input has {len(tokens)} tokens; the embedding context holds {self.model.embed_n_ctx}",
                    param="input")
        return [await self.scheduler.run_job(functools.partial(self._embed_one, tokens)) for tokens in inputs]

    def _embed_one(self, tokens: list[int]) -> list[float]:
        """On the engine thread: one input through the embedding context, mean-pooled, L2-normalised."""
        ctx = self.model.embed_ctx
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, tok in enumerate(tokens):
                batch.token[i] = tok
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = True
            batch.n_tokens = len(tokens)
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed ({rc}) for embeddings")
            ptr = llama_cpp.llama_get_embeddings_seq(ctx, 0)
            if not ptr:
                raise RuntimeError("the model produced no pooled embedding")
            n = self.model.n_embd
            values = list(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float))[:n])
        finally:
            llama_cpp.llama_batch_free(batch)
        norm = math.sqrt(sum(v * v for v in values)) or 1.0
        return [v / norm for v in values]

    # --- shutdown -----------------------------------------------------------------------------

    def close(self) -> None:
        if self.scheduler.stop():
            self.model.close()  # only once nothing can touch the contexts any more


def load_engine(options: EngineSettings) -> LlamaEngine:
    log.info("loading %s (n_ctx %s, %d parallel sequences, %s GPU layers)", options.path,
             options.n_ctx or "auto", options.parallel, options.n_gpu_layers)
    engine = LlamaEngine(options)
    info: dict[str, object | None] = dict(engine.model.describe())
    log.info("model loaded: %s, %s parameters, %d threads; context %d tokens, shared by up to %d sequences "
             "(one request may use all of it)", info["description"], info["n_params"], engine.model.threads,
             engine.n_ctx, engine.parallel)
    return engine
