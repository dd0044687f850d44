"""The scheduler's paths, the chat template choice and the sampler chain, on the real demo model (small, fast).

One engine with a small batch (so a long prompt takes several steps and can be shared or cancelled midway)
serves every scheduler test; `cached_tokens` of each finished request says where its prefix came from.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import numpy as np
import pytest

from app.config import AppConfig
from app.engine.chat import CHAT_FORMATS, select_template
from app.engine.engine import LlamaEngine
from app.engine.sampling import SamplerChain, logits_at
from app.engine.scheduler import MIN_SHARED_PREFIX
from app.engine.types import ContextLengthError, Delta, Finish, GenerationRequest, RequestHandle, SamplingParams

N_BATCH = 32
STORY = "The history of the city is long and full of surprising turns. "


@pytest.fixture(scope="module")
def engine(demo_model: str) -> Iterator[LlamaEngine]:
    config = AppConfig(n_ctx=2048, n_batch=N_BATCH, parallel=4, max_queue=4)
    eng = LlamaEngine(config.engine_settings(demo_model, "demo"))
    yield eng
    eng.close()


def req(engine: LlamaEngine, text: str, max_tokens: int = 4) -> GenerationRequest:
    return GenerationRequest(engine.tokenize(text), max_tokens, SamplingParams(temperature=0))


async def finish_of(handle: RequestHandle) -> tuple[str, Finish]:
    text = ""
    while True:
        event = await asyncio.wait_for(handle.next_event(), 60)
        if isinstance(event, Finish):
            return text, event
        assert isinstance(event, Delta)
        text += event.text


async def first_delta(handle: RequestHandle) -> None:
    while True:
        event = await asyncio.wait_for(handle.next_event(), 60)
        assert not isinstance(event, Finish), event
        if event.token_ids:
            return


def test_prefix_reuse_from_its_own_cache(engine: LlamaEngine) -> None:
    async def scenario() -> tuple[Finish, Finish]:
        loop = asyncio.get_running_loop()
        first = await finish_of(engine.submit(req(engine, "Own cache. " + STORY * 4), loop))
        again = await finish_of(engine.submit(req(engine, "Own cache. " + STORY * 4 + "And then"), loop))
        return first[1], again[1]

    first, again = asyncio.run(scenario())
    assert first.cached_tokens < MIN_SHARED_PREFIX
    assert again.cached_tokens >= first.prompt_tokens - 1  # all but the last prompt token, which is recomputed


def test_prefix_copied_from_another_running_sequence(engine: LlamaEngine) -> None:
    async def scenario() -> tuple[Finish, Finish]:
        loop = asyncio.get_running_loop()
        donor = engine.submit(req(engine, "Copy me. " + STORY * 4, max_tokens=60), loop)
        await first_delta(donor)  # its prompt is in the cache and it is still generating
        taker = engine.submit(req(engine, "Copy me. " + STORY * 4 + "Meanwhile"), loop)
        return (await finish_of(taker))[1], (await finish_of(donor))[1]

    taker, donor = asyncio.run(scenario())
    assert donor.reason == "length" and taker.reason == "length"
    assert taker.cached_tokens >= donor.prompt_tokens - 1


def test_waits_for_a_sequence_computing_the_same_prefix(engine: LlamaEngine) -> None:
    async def scenario() -> tuple[Finish, Finish]:
        loop = asyncio.get_running_loop()
        shared = "Computed once. " + STORY * 8  # ~110 tokens: several steps of N_BATCH
        a = engine.submit(req(engine, shared + "First."), loop)
        b = engine.submit(req(engine, shared + "Second."), loop)  # admitted while `a` still has prompt to go
        return (await finish_of(a))[1], (await finish_of(b))[1]

    a, b = asyncio.run(scenario())
    assert a.prompt_tokens > 3 * N_BATCH
    assert a.cached_tokens < MIN_SHARED_PREFIX
    assert b.cached_tokens >= a.prompt_tokens - 4  # the shared part was computed by `a` alone


def test_cancel_mid_prompt_and_mid_generation(engine: LlamaEngine) -> None:
    async def scenario() -> tuple[Finish, Finish]:
        loop = asyncio.get_running_loop()
        long_prompt = engine.submit(req(engine, "Cancel early. " + STORY * 20, max_tokens=50), loop)
        long_prompt.cancel()  # before its ~280-token prompt is through
        generating = engine.submit(req(engine, "Cancel late.", max_tokens=500), loop)
        await first_delta(generating)
        generating.cancel()
        return (await finish_of(long_prompt))[1], (await finish_of(generating))[1]

    early, late = asyncio.run(scenario())
    assert early.reason == "cancelled" and early.completion_tokens == 0
    assert late.reason == "cancelled" and 0 < late.completion_tokens < 500
    assert engine.active == 0 and engine.scheduler.in_system == 0


def test_a_request_beyond_its_context_is_refused_up_front(engine: LlamaEngine) -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ContextLengthError) as err:
            engine.submit(req(engine, "Too long", max_tokens=engine.n_ctx_seq), loop)
        assert str(engine.n_ctx_seq) in str(err.value)
    finally:
        loop.close()
    assert engine.scheduler.in_system == 0


# --- templates ---------------------------------------------------------------------------------------------------

def test_no_model_template_falls_back_to_chatml_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        template = select_template("auto", None, "<bos>", "<eos>")
    assert template.name == "chatml" and "ChatML" in caplog.text
    text = template.render([{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_explicit_format_wins_over_the_models_template() -> None:
    template = select_template("gemma", "{{ 'model template' }}", "<bos>", "<eos>")
    assert template.name == "gemma" and template.stop == CHAT_FORMATS["gemma"][1]
    text = template.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_the_models_own_template_is_used_with_its_stop_strings() -> None:
    source = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    template = select_template("auto", source, "<bos>", "<eos>")
    assert template.name == "model"
    assert template.stop[0] == "<eos>" and "<|im_end|>" in template.stop


# --- the sampler chain ---------------------------------------------------------------------------------------------

def test_greedy_chain_picks_the_argmax_and_seeds_repeat(engine: LlamaEngine) -> None:
    tokens = engine.tokenize("The capital of France is")

    def run(params: SamplingParams) -> tuple[int, int]:
        def job() -> tuple[int, int]:
            import llama_cpp

            model = engine.model
            llama_cpp.llama_memory_seq_rm(model.memory, 3, 0, -1)
            batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
            try:
                for i, tok in enumerate(tokens):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, i, 1
                    batch.seq_id[i][0] = 3
                    batch.logits[i] = i == len(tokens) - 1
                batch.n_tokens = len(tokens)
                assert llama_cpp.llama_decode(model.ctx, batch) == 0
                last = len(tokens) - 1  # outputs are addressed by their index in the batch
                argmax = int(np.argmax(logits_at(model.ctx, last, model.n_vocab)))
                chain = SamplerChain(model.vocab, model.n_vocab, params)
                try:
                    return chain.sample(model.ctx, last), argmax
                finally:
                    chain.close()
            finally:
                llama_cpp.llama_batch_free(batch)
                llama_cpp.llama_memory_seq_rm(model.memory, 3, 0, -1)

        async def on_engine_thread() -> tuple[int, int]:
            return await engine.scheduler.run_job(job)

        return asyncio.run(on_engine_thread())

    greedy, argmax = run(SamplingParams(temperature=0))
    assert greedy == argmax
    seeded = [run(SamplingParams(temperature=1.5, seed=42))[0] for _ in range(3)]
    assert len(set(seeded)) == 1


def test_a_build_that_cannot_offload_says_so_when_gpu_layers_are_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    import llama_cpp

    from app.engine.model import gpu_offload_problem

    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: False)
    problem = gpu_offload_problem(9999, 2)
    assert problem is not None and "runs on the CPU" in problem and "GGML_CUDA=on" in problem
    assert gpu_offload_problem(0, 2) is None and gpu_offload_problem(9999, 0) is None
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)
    assert gpu_offload_problem(9999, 2) is None
