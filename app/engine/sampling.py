"""Sampler chains (llama.cpp's own samplers) and log-probabilities from raw logits."""

from __future__ import annotations

import ctypes
import json
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from app.engine.schema_limits import check_grammar, check_schema
from app.engine.types import InvalidRequestError, SamplingParams

# llama.cpp's penalty window, as its server uses by default.
PENALTY_LAST_N = 64


def grammar_for_response_format(response_format: dict[str, Any] | None) -> str | None:
    """GBNF for OpenAI's response_format; None when output is free text.

    Synchronous and bounded: the schema is checked before conversion, so a call costs
    milliseconds at most; callers on an event loop still run it in a worker thread.
    """
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        schema = response_format.get("schema")
        return _schema_grammar(schema) if schema else JSON_GBNF
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequestError("response_format.json_schema.schema must be a JSON Schema object",
                                      param="response_format")
        return _schema_grammar(schema)
    raise InvalidRequestError(f"response_format type {kind!r} is not supported", param="response_format")


def _schema_grammar(schema: Any) -> str:
    """GBNF for one client schema, bounded before and after conversion (see schema_limits)."""
    check_schema(schema)
    try:
        gbnf = json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises assorted errors on schemas it cannot express
        # The converter's messages can quote the whole schema: keep the client's error short.
        raise InvalidRequestError(f"response_format schema cannot be enforced: {str(exc)[:300]}",
                                  param="response_format") from None
    check_grammar(gbnf)
    return gbnf


def is_plain_greedy(params: SamplingParams) -> bool:
    """Temperature 0 with nothing that reshapes the logits: the choice is the logits' argmax."""
    return (params.temperature <= 0 and not params.grammar and not params.logit_bias
            and not params.presence_penalty and not params.frequency_penalty and params.repeat_penalty == 1.0)


class SamplerChain:
    """One llama.cpp sampler chain for one sequence; freed with `close()`.

    Plain greedy sampling skips the chain: llama.cpp would copy the whole vocabulary (262k candidates for
    Gemma 3) into a candidate array per token to find its maximum; an argmax over the logits in place picks the
    same token (the first of equal maxima, as llama.cpp's greedy sampler does: tests/test_sampling_fast_path.py).
    """

    def __init__(self, vocab: Any, n_vocab: int, params: SamplingParams) -> None:
        self._n_vocab = n_vocab
        self._chain: Any | None = None
        if is_plain_greedy(params):
            return
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        self._chain = chain

        def add(sampler: Any) -> None:
            if not sampler:
                raise InvalidRequestError("sampling parameters were rejected by llama.cpp")
            llama_cpp.llama_sampler_chain_add(chain, sampler)

        try:
            if params.grammar:
                grammar = llama_cpp.llama_sampler_init_grammar(vocab, params.grammar.encode(), b"root")
                if not grammar:
                    raise InvalidRequestError("the grammar for response_format could not be compiled",
                                              param="response_format")
                add(grammar)
            if params.logit_bias:
                for token in params.logit_bias:
                    if not 0 <= token < n_vocab:
                        raise InvalidRequestError(f"logit_bias: token id {token} is outside the vocabulary "
                                                  f"(0..{n_vocab - 1})", param="logit_bias")
                biases = (llama_cpp.llama_logit_bias * len(params.logit_bias))(
                    *(llama_cpp.llama_logit_bias(token, bias) for token, bias in params.logit_bias.items()))
                add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(biases), biases))
            if params.presence_penalty or params.frequency_penalty or params.repeat_penalty != 1.0:
                add(llama_cpp.llama_sampler_init_penalties(
                    n_vocab, PENALTY_LAST_N, params.repeat_penalty,
                    params.frequency_penalty, params.presence_penalty))
            if params.temperature <= 0:
                add(llama_cpp.llama_sampler_init_greedy())
            else:
                if params.top_k > 0:
                    add(llama_cpp.llama_sampler_init_top_k(params.top_k))
                if params.top_p < 1.0:
                    add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
                if params.min_p > 0.0:
                    add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
                add(llama_cpp.llama_sampler_init_temp(params.temperature))
                seed = llama_cpp.LLAMA_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
                add(llama_cpp.llama_sampler_init_dist(seed))
        except Exception:
            self.close()
            raise

    def sample(self, ctx: Any, index: int) -> int:
        """Sample from the logits at batch output `index` and advance the chain's state."""
        if self._chain is None:
            return int(np.argmax(logits_at(ctx, index, self._n_vocab)))
        return int(llama_cpp.llama_sampler_sample(self._chain, ctx, index))

    def close(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


def logits_at(ctx: Any, index: int, n_vocab: int) -> np.ndarray:
    ptr = llama_cpp.llama_get_logits_ith(ctx, index)
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))


def token_logprobs(logits: np.ndarray, token: int, top_n: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of `token` under the model's raw distribution, and the top `top_n`."""
    x = logits.astype(np.float64, copy=False)
    m = float(x.max())
    lse = m + float(np.log(np.exp(x - m).sum()))
    chosen = float(x[token] - lse)
    top: list[tuple[int, float]] = []
    if top_n > 0:
        idx = np.argpartition(-x, top_n - 1)[:top_n]
        idx = idx[np.argsort(-x[idx])]
        top = [(int(i), float(x[i] - lse)) for i in idx]
    return chosen, top
