"""Dynamic sharing of the unified KV cache on the real model: one request may use the whole context, admission
is by free cells, and a cache that fills during generation preempts the newest sequence (recomputed later)
without losing or cutting anything."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from app.config import AppConfig
from app.engine.cells import CellLedger
from app.engine.engine import LlamaEngine
from app.engine.types import ContextLengthError, Delta, Finish, GenerationRequest, SamplingParams

N_CTX = 512


@pytest.fixture(scope="module")
def engine(demo_model: str) -> Iterator[LlamaEngine]:
    config = AppConfig(n_ctx=N_CTX, n_batch=128, parallel=4, max_queue=8)
    eng = LlamaEngine(config.engine_settings(demo_model, "demo"))
    yield eng
    eng.close()


def prompt(engine: LlamaEngine, topic: str, words: int) -> list[int]:
    text = f"Write a long story about {topic}. " + " ".join(f"{topic}{i % 10}" for i in range(words))
    return engine.tokenize(text)


def request(tokens: list[int], max_tokens: int) -> GenerationRequest:
    return GenerationRequest(tokens, max_tokens, SamplingParams(temperature=0), ignore_eos=True)


async def run(engine: LlamaEngine, requests: list[GenerationRequest],
              cancel_after: dict[int, int] | None = None) -> list[tuple[list[int], Finish]]:
    loop = asyncio.get_running_loop()
    handles = [engine.submit(r, loop) for r in requests]

    async def drain(i: int) -> tuple[list[int], Finish]:
        tokens: list[int] = []
        while True:
            event = await asyncio.wait_for(handles[i].next_event(), 120)
            if isinstance(event, Delta):
                tokens += event.token_ids
                if cancel_after and i in cancel_after and len(tokens) >= cancel_after[i]:
                    handles[i].cancel()
            elif isinstance(event, Finish):
                return tokens, event

    return list(await asyncio.gather(*(drain(i) for i in range(len(handles)))))


def test_the_ledger_counts_shared_cells_once() -> None:
    ledger = CellLedger(100)
    a: list[int] = []
    ledger.grow(a, 10)
    b = ledger.share(a, 6)
    ledger.grow(b, 4)
    assert ledger.used == 14  # 6 shared + 4 of a's own + 4 of b's own
    ledger.truncate(a, 0)
    assert ledger.used == 10 and len(b) == 10  # b keeps the shared prefix
    ledger.truncate(b, 3)
    assert ledger.used == 3 and ledger.free == 97


def test_one_request_may_use_the_whole_context(engine: LlamaEngine) -> None:
    assert engine.n_ctx_seq == engine.model.n_ctx  # not n_ctx / parallel
    tokens = prompt(engine, "rivers", 90)
    assert N_CTX // engine.parallel < len(tokens) < N_CTX // 2
    [(out, finish)] = asyncio.run(run(engine, [request(tokens, N_CTX - len(tokens) - 8)]))
    assert finish.reason == "length" and len(out) == N_CTX - len(tokens) - 8


def test_a_request_larger_than_the_context_is_refused_at_once(engine: LlamaEngine) -> None:
    tokens = prompt(engine, "rivers", 300)
    with pytest.raises(ContextLengthError, match="context is"):
        engine.submit(request(tokens, N_CTX), asyncio.new_event_loop())


def test_overfilling_the_cache_preempts_and_every_stream_completes(engine: LlamaEngine) -> None:
    topics = ["cats", "ships", "trees", "stars"]
    prompts = [prompt(engine, t, 20) for t in topics]
    max_tokens = 150
    assert sum(len(p) + max_tokens for p in prompts) > engine.model.n_ctx  # cannot all fit at once
    alone = [asyncio.run(run(engine, [request(p, max_tokens)]))[0][0] for p in prompts]
    before = engine.scheduler.preemptions
    together = asyncio.run(run(engine, [request(p, max_tokens) for p in prompts]))
    assert engine.scheduler.preemptions > before  # the cache filled and sequences were preempted
    for tokens, finish in together:
        assert finish.reason == "length" and finish.error is None
        assert finish.completion_tokens == max_tokens and len(tokens) == max_tokens  # nothing lost or repeated
        assert finish.prompt_tokens in {len(p) for p in prompts}
    # Greedy text is not fully batch-invariant in llama.cpp's CPU kernels: measured here, the fourth of four
    # streams decoded together differs from its solo run with no preemption at all (n_ctx 2048), and the
    # other three match it token for token, preempted and recomputed or not. So: most streams match exactly.
    identical = sum(tokens == solo for (tokens, _), solo in zip(together, alone, strict=True))
    assert identical >= 2, identical
    assert engine.scheduler.in_system == 0
    assert engine.scheduler.cells.used <= engine.model.n_ctx


def test_a_preempted_request_can_be_cancelled(engine: LlamaEngine) -> None:
    prompts = [prompt(engine, t, 20) for t in ("cats", "ships", "trees", "stars")]
    results = asyncio.run(run(engine, [request(p, 150) for p in prompts], cancel_after={3: 60}))
    reasons = [finish.reason for _, finish in results]
    assert reasons[:3] == ["length"] * 3 and reasons[3] == "cancelled"
    assert engine.scheduler.in_system == 0 and engine.scheduler.queue_depth == 0


def test_preemptions_and_the_cache_fill_are_reported(engine: LlamaEngine) -> None:
    from app.telemetry.reporter import engine_series

    rows = {(r.title, r.series): r.value for r in engine_series(engine)}
    assert rows[("kv cache", "preemptions")] == engine.scheduler.preemptions > 0  # from the overfill test
    assert rows[("kv cache", "cells")] == engine.model.n_ctx
    assert 0 < rows[("kv cache", "cells used")] <= engine.model.n_ctx  # idle caches kept for prefix reuse
    info = engine.context_info()
    assert info["n_ctx"] == info["max_request_tokens"] == engine.model.n_ctx and info["n_ctx_train"] == 32768


def test_a_rebuilt_sequence_preempted_while_waiting_for_a_donor_keeps_its_tokens(engine: LlamaEngine) -> None:
    """A parked request being rebuilt may wait for another sequence's prefix; preempted again then, it must keep
    what it was rebuilding (prompt and generated tokens) and the token it had sampled, not restart its prompt."""
    from app.engine.text import TextStream
    from app.engine.types import RequestHandle

    scheduler = engine.scheduler
    prompt = [2, 10, 11, 12]
    rebuilding = prompt + [20, 21, 22]  # the prompt and three generated tokens

    def job() -> tuple[list[int], int | None]:
        slot, donor = scheduler._slots[0], scheduler._slots[1]
        assert not slot.busy and not donor.busy
        handle = RequestHandle(request(prompt, 8), asyncio.new_event_loop())
        slot.handle, slot.text, slot.tokens = handle, TextStream([]), rebuilding
        slot.wait_for, slot.resume_token, slot.pending = (donor, 5), 23, []
        scheduler._preempt(slot)
        parked = scheduler._parked.popleft()
        scheduler.preemptions -= 1
        return parked.tokens, parked.resume_token

    async def run() -> tuple[list[int], int | None]:
        return await scheduler.run_job(job)

    tokens, resume = asyncio.run(run())
    assert tokens == rebuilding and resume == 23
