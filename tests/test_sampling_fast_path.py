"""The greedy fast path picks exactly what llama.cpp's greedy sampler picks, on the same logits: logits recorded
from the real model, and constructed ties; and whole generations are unchanged."""

from __future__ import annotations

import asyncio
import ctypes
from collections.abc import Iterator

import llama_cpp
import numpy as np
import pytest

from app.config import AppConfig
from app.engine.engine import LlamaEngine
from app.engine.sampling import SamplerChain, is_plain_greedy, logits_at
from app.engine.types import Delta, Finish, GenerationRequest, SamplingParams


def llama_greedy(logits: np.ndarray) -> int:
    """llama.cpp's own greedy sampler applied to a candidate array built from `logits`."""
    n = len(logits)
    data = (llama_cpp.llama_token_data * n)()
    for i, value in enumerate(logits.tolist()):
        data[i].id = i
        data[i].logit = value
        data[i].p = 0.0
    array = llama_cpp.llama_token_data_array(data, n, -1, False)
    sampler = llama_cpp.llama_sampler_init_greedy()
    try:
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
    finally:
        llama_cpp.llama_sampler_free(sampler)
    return int(data[array.selected].id)


@pytest.fixture(scope="module")
def engine(demo_model: str) -> Iterator[LlamaEngine]:
    eng = LlamaEngine(AppConfig(n_ctx=1024, n_batch=64, parallel=2, max_queue=2).engine_settings(demo_model, "d"))
    yield eng
    eng.close()


def recorded_logits(engine: LlamaEngine, text: str) -> np.ndarray:
    """The real model's logits after `text`, copied out of the generation context (on the engine thread)."""
    model = engine.model
    slot = engine.scheduler._slots[1]  # an idle sequence, borrowed and given back empty

    def job() -> np.ndarray:
        assert not slot.busy
        tokens = model.tokenize(text)
        batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
        try:
            engine.scheduler._forget(slot)
            for i, tok in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, i, 1
                batch.seq_id[i][0] = 1
                batch.logits[i] = i == len(tokens) - 1
            batch.n_tokens = len(tokens)
            assert llama_cpp.llama_decode(model.ctx, batch) == 0
            return logits_at(model.ctx, -1, model.n_vocab).copy()
        finally:
            llama_cpp.llama_memory_seq_rm(model.memory, 1, 0, -1)
            llama_cpp.llama_batch_free(batch)

    async def run() -> np.ndarray:
        return await engine.scheduler.run_job(job)

    return asyncio.run(run())


@pytest.mark.parametrize("text", ["Once upon a time", "The capital of France is", "1, 2, 3, 4,", "def main():"])
def test_argmax_equals_llama_cpps_greedy_on_recorded_logits(engine: LlamaEngine, text: str) -> None:
    logits = recorded_logits(engine, text)
    assert logits.shape == (engine.model.n_vocab,)
    assert int(np.argmax(logits)) == llama_greedy(logits)


def test_ties_pick_the_first_maximum_as_llama_cpp_does() -> None:
    logits = np.zeros(1000, dtype=np.float32)
    logits[[17, 400, 999]] = 5.0
    assert int(np.argmax(logits)) == llama_greedy(logits) == 17
    logits = np.full(1000, -np.inf, dtype=np.float32)
    logits[3] = -1.0
    assert int(np.argmax(logits)) == llama_greedy(logits) == 3


def test_only_plain_greedy_takes_the_fast_path() -> None:
    assert is_plain_greedy(SamplingParams(temperature=0))
    for params in (SamplingParams(temperature=0.7), SamplingParams(temperature=0, grammar="root ::= \"a\""),
                   SamplingParams(temperature=0, logit_bias={5: -100.0}),
                   SamplingParams(temperature=0, presence_penalty=0.5),
                   SamplingParams(temperature=0, repeat_penalty=1.1)):
        assert not is_plain_greedy(params)


def generate(engine: LlamaEngine, text: str, force_chain: bool, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    if force_chain:
        monkeypatch.setattr("app.engine.sampling.is_plain_greedy", lambda params: False)
    else:
        monkeypatch.undo()

    async def run() -> list[int]:
        handle = engine.submit(GenerationRequest(engine.tokenize(text), 48, SamplingParams(temperature=0),
                                                 ignore_eos=True), asyncio.get_running_loop())
        out: list[int] = []
        while True:
            event = await handle.next_event()
            if isinstance(event, Delta):
                out += event.token_ids
            elif isinstance(event, Finish):
                return out

    return asyncio.run(run())


def test_a_greedy_generation_is_the_same_through_either_path(engine: LlamaEngine,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    chain = generate(engine, "The history of the city", True, monkeypatch)
    fast = generate(engine, "The history of the city", False, monkeypatch)
    assert len(fast) == 48 and fast == chain


def test_the_fast_path_holds_no_llama_sampler() -> None:
    sampler = SamplerChain(None, 10, SamplingParams(temperature=0))
    assert sampler._chain is None
    sampler.close()
