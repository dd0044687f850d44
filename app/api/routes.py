"""Thin HTTP routing: check readiness, hand over to serving.py, return JSON or SSE."""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from app.api import messages as messages_api
from app.api import responses as responses_api
from app.api import serving
from app.api.choices import ChoiceSet, ChoiceSpec, collect, until_disconnect, usage_of
from app.api.context import ServingContext
from app.api.errors import APIError, error_body
from app.api.messages import CountTokensRequest, MessagesRequest
from app.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ModelCard,
    ModelList,
    SamplingFields,
    TokenizeRequest,
)
from app.api.record import record_of
from app.api.responses import ResponsesRequest
from app.engine.types import EngineProtocol
from app.lifecycle import State
from app.telemetry.prometheus import render

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def context_of(request: Request) -> ServingContext:
    context: ServingContext = request.app.state.context
    return context


def engine_of(request: Request) -> EngineProtocol:
    lifecycle = context_of(request).lifecycle
    if lifecycle.stopping:
        raise APIError(503, "The server is shutting down.", code="shutting_down")
    if not lifecycle.serving or lifecycle.engine is None:
        raise APIError(503, "The model is still loading; retry shortly (GET /health reports readiness).",
                       code="model_not_ready", headers={"Retry-After": "2"})
    return lifecycle.engine


def health_router() -> APIRouter:
    router = APIRouter()

    @router.head("/health", include_in_schema=False)  # probes use HEAD
    @router.get("/health")
    async def health(request: Request) -> JSONResponse:
        lifecycle = context_of(request).lifecycle
        engine = lifecycle.engine
        if lifecycle.serving and engine is not None:
            busy = engine.active
            return JSONResponse({"status": "ok", "slots_idle": engine.parallel - busy,
                                 "slots_processing": busy, "queue_depth": engine.queue_depth,
                                 **engine.context_info()})
        if lifecycle.state is State.FAILED:
            body = error_body(f"Model failed to load: {lifecycle.failure}", "server_error", None,
                              "model_load_failed")
            return JSONResponse({"status": "failed", **body}, status_code=503)
        if lifecycle.state in (State.STOPPING, State.STOPPED):
            return JSONResponse({"status": "stopping", **error_body("Shutting down", "service_unavailable")},
                                status_code=503)
        return JSONResponse({"status": "loading", **error_body("Loading model", "service_unavailable", None,
                                                                 "model_not_ready")}, status_code=503)

    return router


def api_router() -> APIRouter:
    """The OpenAI routes (behind the key: see auth.AuthMiddleware)."""
    router = APIRouter()

    # llama-server's paths without /v1 (clients configured for it use them): same handlers, same auth.
    @router.get("/v1/models")
    @router.get("/models", include_in_schema=False)
    async def list_models(request: Request) -> ModelList:
        return ModelList(data=[model_card(context_of(request))])

    @router.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> ModelCard:
        served = context_of(request).model_id
        if model_id != served:
            raise APIError(404, f"The model '{model_id}' does not exist; this server serves '{served}'.",
                           code="model_not_found", param="model")
        return model_card(context_of(request))

    @router.post("/v1/chat/completions", response_model=None)
    @router.post("/chat/completions", response_model=None, include_in_schema=False)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        engine = engine_of(request)
        specs, parsing = await serving.build_chat(engine, body)
        shape = serving.ChatShape(engine.model_id, body.logprobs, include_usage(body), parsing)
        return await generate(request, engine, specs, body.stream, shape, "n")

    @router.post("/v1/completions", response_model=None)
    @router.post("/completions", response_model=None, include_in_schema=False)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        engine = engine_of(request)
        specs = await serving.build_completion(engine, body)
        shape = serving.CompletionShape(engine.model_id, body.logprobs is not None, include_usage(body))
        return await generate(request, engine, specs, body.stream, shape, "prompt")

    @router.post("/v1/embeddings")
    @router.post("/embeddings", include_in_schema=False)
    async def embeddings(body: EmbeddingRequest, request: Request) -> dict[str, Any]:
        engine = engine_of(request)
        if not engine.embeddings_enabled:
            raise APIError(400, "Embeddings are not enabled on this server: start it with --embeddings "
                                "(or set Advanced Options/embeddings to true).", code="embeddings_disabled",
                           param="input")
        raw = body.input
        if isinstance(raw, str):
            texts: list[Any] = [raw]
        elif all(isinstance(x, int) for x in raw):
            texts = [raw]
        else:
            texts = list(raw)
        inputs = []
        for item in texts:
            if isinstance(item, str):
                if not item:
                    raise APIError(400, "input strings must not be empty", param="input")
                inputs.append(await asyncio.to_thread(engine.tokenize, item, True, False))
            else:
                inputs.append(serving.check_token_ids(engine, item, "input"))
        vectors = await engine.embed(inputs)
        n_tokens = sum(len(t) for t in inputs)
        record_of(request.scope).prompt_tokens = n_tokens
        data = []
        for i, vec in enumerate(vectors):
            emb: Any = vec
            if body.encoding_format == "base64":
                emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": engine.model_id,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    @router.post("/v1/responses", response_model=None)
    async def responses(body: ResponsesRequest, request: Request) -> Any:
        engine = engine_of(request)
        chat = responses_api.to_chat(body)
        specs, parsing = await serving.build_chat(engine, chat)
        return await generate(request, engine, specs, body.stream,
                              responses_api.ResponsesShape(engine.model_id, body, parsing), "n")

    @router.post("/v1/messages", response_model=None)
    async def messages(body: MessagesRequest, request: Request) -> Any:
        engine = engine_of(request)
        chat = messages_api.to_chat(body)
        specs, parsing = await serving.build_chat(engine, chat)
        return await generate(request, engine, specs, body.stream,
                              messages_api.MessagesShape(engine.model_id, body, parsing), "n")

    @router.post("/v1/messages/count_tokens")
    async def count_tokens(body: CountTokensRequest, request: Request) -> dict[str, int]:
        engine = engine_of(request)
        _, prompt = await serving.render_chat(engine, messages_api.count_request(body))
        record_of(request.scope).prompt_tokens = len(prompt.tokens)
        return {"input_tokens": len(prompt.tokens)}

    return router


def extras_router() -> APIRouter:
    """llama.cpp server's /tokenize and /detokenize, /metrics and the OpenAPI schema (behind the key)."""
    router = APIRouter()

    @router.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(request.app.openapi())

    @router.get("/metrics")
    async def metrics(request: Request) -> Response:
        registry = context_of(request).stats.metrics.registry
        body = await asyncio.to_thread(render, registry)  # reads the hardware sampler: not on the event loop
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
        engine = engine_of(request)
        tokens = await asyncio.to_thread(engine.tokenize, body.content, body.add_special, body.parse_special)
        if body.with_pieces:
            return {"tokens": [{"id": t, "piece": engine.token_piece(t)} for t in tokens]}
        return {"tokens": tokens}

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
        engine = engine_of(request)
        tokens = serving.check_token_ids(engine, body.tokens, "tokens") if body.tokens else []
        return {"content": await asyncio.to_thread(engine.detokenize, tokens)}

    return router


async def generate(request: Request, engine: EngineProtocol, specs: list[ChoiceSpec], streamed: bool,
                   shape: serving.Shape, count_param: str) -> Any:
    """Submit every choice, then stream them (SSE) or collect them into one response."""
    choice_set = ChoiceSet(engine)
    await choice_set.submit(specs, count_param)
    if streamed:
        return EngineStream(serving.stream(choice_set, shape), request, choice_set)
    await collect(choice_set, request)
    record_usage(request, choice_set)
    error = choice_set.first_error()
    if error is not None:
        raise error
    return shape.response(choice_set.choices)


def include_usage(body: SamplingFields) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def model_card(context: ServingContext) -> ModelCard:
    return ModelCard(id=context.model_id)


def record_usage(request: Request, choice_set: ChoiceSet) -> None:
    usage = usage_of(choice_set.choices)
    record = record_of(request.scope)
    if choice_set.first_token_at is not None:
        record.ttft_s = choice_set.first_token_at - choice_set.started_at
    record.prompt_tokens = usage.prompt_tokens
    record.completion_tokens = usage.completion_tokens


class EngineStream(StreamingResponse):
    """SSE whose generation is cancelled the moment the response ends, however it ends.

    Starlette stops iterating when the client goes away but closes the
    generator only when it is collected; cancelling here frees the sequence at
    once and records the usage for the stats.
    """

    def __init__(self, content: AsyncIterator[str], request: Request, choice_set: ChoiceSet) -> None:
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self._request = request
        self._choice_set = choice_set

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # uvicorn's send() goes quiet after a disconnect instead of raising, so listen for it ourselves.
        watcher = asyncio.create_task(until_disconnect(receive, self._choice_set.cancel))
        try:
            await super().__call__(scope, receive, send)
        finally:
            watcher.cancel()
            self._choice_set.cancel()
            record_usage(self._request, self._choice_set)
