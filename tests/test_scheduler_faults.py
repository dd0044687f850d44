"""Fault injection into the real scheduler on the real model: one failure never poisons the engine.

At each stage a request passes through (admission, llama_decode, sampling, text decoding, delivery) a failure
is injected; every request must then be finished, the scheduler's in-system count must return to zero, and
the next request must be served normally.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from app.config import AppConfig
from app.engine.engine import LlamaEngine
from app.engine.types import Delta, EngineError, Finish, GenerationRequest, InvalidRequestError, SamplingParams


@pytest.fixture(scope="module")
def engine(demo_model: str) -> Iterator[LlamaEngine]:
    config = AppConfig(n_ctx=1024, n_batch=64, parallel=2, max_queue=4)
    eng = LlamaEngine(config.engine_settings(demo_model, "demo"))
    yield eng
    eng.close()


def request(engine: LlamaEngine, text: str = "Once upon a time", max_tokens: int = 8,
            grammar: str | None = None) -> GenerationRequest:
    return GenerationRequest(engine.tokenize(text), max_tokens, SamplingParams(temperature=0, grammar=grammar))


async def run_all(engine: LlamaEngine, requests: list[GenerationRequest]) -> list[tuple[str, Finish]]:
    loop = asyncio.get_running_loop()
    handles = [engine.submit(r, loop) for r in requests]
    out = []
    for h in handles:
        text = ""
        while True:
            event = await asyncio.wait_for(h.next_event(), 30)
            if isinstance(event, Delta):
                text += event.text
            elif isinstance(event, Finish):
                out.append((text, event))
                break
    return out


def wait_empty(engine: LlamaEngine) -> None:
    for _ in range(200):
        if engine.scheduler.in_system == 0:
            return
        asyncio.run(asyncio.sleep(0.01))
    raise AssertionError(f"{engine.scheduler.in_system} requests still in the system")


def boom(*_: Any, **__: Any) -> Any:
    raise RuntimeError("injected fault")


STAGES: dict[str, Callable[[pytest.MonkeyPatch, LlamaEngine], None]] = {
    "admission": lambda mp, eng: mp.setattr(eng.scheduler, "_assign", boom),
    "llama_decode": lambda mp, eng: mp.setattr("app.engine.scheduler.llama_cpp.llama_decode", boom),
    "sampling": lambda mp, eng: mp.setattr("app.engine.sampling.SamplerChain.sample", boom),
    "text": lambda mp, eng: mp.setattr("app.engine.text.TextStream.push", boom),
    "delivery": lambda mp, eng: mp.setattr("app.engine.types.RequestHandle.emit", boom),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_fault_at_any_stage_finishes_its_requests_and_frees_their_place(engine: LlamaEngine, stage: str) -> None:
    reference = asyncio.run(run_all(engine, [request(engine)]))[0]
    with pytest.MonkeyPatch.context() as mp:
        STAGES[stage](mp, engine)
        if stage == "delivery":
            # Nobody can be told (the loop is gone, say): the places must still come back.
            loop = asyncio.new_event_loop()
            for _ in range(3):
                engine.submit(request(engine), loop)
            wait_empty(engine)
            loop.close()
        else:
            results = asyncio.run(run_all(engine, [request(engine) for _ in range(3)]))
            assert [f.reason for _, f in results] == ["error"] * 3
            assert all(isinstance(f.error, EngineError) and "injected" not in str(f.error) for _, f in results)
    wait_empty(engine)
    # The engine is not poisoned: the same request gives the same text as before the fault.
    after = asyncio.run(run_all(engine, [request(engine)]))[0]
    assert after[1].reason == "length" and after[0] == reference[0]


def test_a_bad_grammar_fails_its_request_before_it_enters_the_scheduler(engine: LlamaEngine) -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(InvalidRequestError) as err:
            engine.submit(request(engine, grammar='root ::= "\ud800"'), loop)
        assert err.value.param == "response_format"
        with pytest.raises(InvalidRequestError):
            engine.submit(request(engine, grammar="root ::= undefined-rule"), loop)
    finally:
        loop.close()
    assert engine.scheduler.in_system == 0
    results = asyncio.run(run_all(engine, [request(engine), request(engine, grammar='root ::= "yes" | "no"')]))
    assert [f.reason for _, f in results] == ["length", "stop"]
    assert results[1][0] in ("yes", "no")


def test_cancel_and_queue_overflow_release_their_places(engine: LlamaEngine) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        handles = [engine.submit(request(engine, max_tokens=200), loop) for _ in range(engine.capacity)]
        with pytest.raises(EngineError):
            engine.submit(request(engine), loop)
        for h in handles:
            h.cancel()
        for h in handles:
            while not isinstance(await asyncio.wait_for(h.next_event(), 30), Finish):
                pass
    asyncio.run(scenario())
    wait_empty(engine)
