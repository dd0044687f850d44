"""End to end: `python -m app` on the real Gemma 3 270M model, driven by the official openai client."""

from __future__ import annotations

import json
import threading
import time

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import API_KEY, AppProcess


@pytest.fixture
def client(real_app: AppProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=real_app.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_models_lists_the_file_name(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["gemma-3-270m-q4_k_m.gguf"]


def test_chat_completion_and_stream_agree(client: openai.OpenAI) -> None:
    kwargs = dict(model="gemma", messages=[{"role": "system", "content": "You answer briefly."},
                                           {"role": "user", "content": "Name three colors."}],
                  max_tokens=24, temperature=0)
    whole = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content  # ChatML fallback: a base model still answers
    assert whole.usage is not None and 0 < whole.usage.completion_tokens <= 24
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))  # type: ignore[call-overload]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completion_with_logprobs_echo_and_stop(client: openai.OpenAI) -> None:
    out = client.completions.create(model="gemma", prompt="The capital of France is", max_tokens=8,
                                    temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert lp is not None and lp.token_logprobs and all(v <= 0 for v in lp.token_logprobs)
    assert "".join(lp.tokens or []) == out.choices[0].text
    echoed = client.completions.create(model="gemma", prompt="The capital of France is", max_tokens=8,
                                       temperature=0, echo=True)
    assert echoed.choices[0].text == "The capital of France is" + out.choices[0].text
    first_word = out.choices[0].text.split()[0]
    stopped = client.completions.create(model="gemma", prompt="The capital of France is", max_tokens=8,
                                        temperature=0, stop=[first_word])
    assert first_word not in stopped.choices[0].text
    assert stopped.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_repeatable(client: openai.OpenAI) -> None:
    a = client.completions.create(model="g", prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=7)
    b = client.completions.create(model="g", prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=7)
    assert a.choices[0].text == b.choices[0].text


def test_json_schema_output_validates(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    out = client.chat.completions.create(
        model="g", messages=[{"role": "user", "content": "Describe a person as JSON."}], max_tokens=64,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    data = json.loads(out.choices[0].message.content or "")
    jsonschema.validate(data, schema)


def test_json_object_output_parses(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="g", messages=[{"role": "user", "content": "Give me a JSON object."}], max_tokens=48,
        temperature=0, response_format={"type": "json_object"})
    content = out.choices[0].message.content or ""
    # The base model tends to keep adding keys; the grammar still forces an object from the first character.
    assert content.startswith("{"), content
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


def test_embeddings(client: openai.OpenAI) -> None:
    out = client.embeddings.create(model="g", input=["a cat", "a dog"])
    assert len(out.data) == 2
    vec = out.data[0].embedding
    assert len(vec) == 640
    assert abs(sum(v * v for v in vec) - 1.0) < 1e-3


def test_auth_failure(real_app: AppProcess) -> None:
    bad = openai.OpenAI(base_url=real_app.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    # The key is shown where the user needs it (the announcement and its test command), never elsewhere.
    leaks = [line for line in real_app.lines if API_KEY in line
             and "API key: " not in line and "test: curl" not in line]
    assert leaks == []


def test_bad_input_then_still_serving(client: openai.OpenAI, real_app: AppProcess) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="g", prompt="hello " * 5000, max_tokens=4)  # beyond n_ctx 4096
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="g", messages=[], max_tokens=4)
    r = httpx.post(real_app.url + "/v1/chat/completions", content=b"{nope",
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    for bad_ids in ([-1], [10**9], []):
        r = httpx.post(real_app.url + "/v1/embeddings", json={"input": [bad_ids] if bad_ids else [[]]},
                       headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input", r.text
        r = httpx.post(real_app.url + "/v1/completions", json={"prompt": bad_ids or [[]], "max_tokens": 2},
                       headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 400, r.text
    out = client.completions.create(model="g", prompt="Hi", max_tokens=2)
    assert out.choices[0].text


def test_tokenize_round_trip(real_app: AppProcess) -> None:
    h = {"Authorization": f"Bearer {API_KEY}"}
    toks = httpx.post(real_app.url + "/tokenize", json={"content": "Hello world"}, headers=h).json()["tokens"]
    assert toks == [9259, 1902]
    text = httpx.post(real_app.url + "/detokenize", json={"tokens": toks}, headers=h).json()["content"]
    assert text == "Hello world"


def concurrent_streams(client: openai.OpenAI, prompts: list[str],
                       max_tokens: int) -> dict[int, tuple[str, str | None, int]]:
    """Stream every prompt at once (fixed length); per prompt: text, last finish reason, completion tokens."""
    results: dict[int, tuple[str, str | None, int]] = {}

    def run(i: int) -> None:
        chunks = list(client.completions.create(model="g", prompt=prompts[i], max_tokens=max_tokens, temperature=0,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        results[i] = (text, reason, chunks[-1].usage.completion_tokens if chunks[-1].usage else -1)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_three_concurrent_streams_complete_in_full(client: openai.OpenAI) -> None:
    results = concurrent_streams(client, ["Once upon a time", "The quick brown fox", "In the year 1492"], 32)
    assert sorted(results) == [0, 1, 2]
    for text, reason, n in results.values():
        assert reason == "length" and n == 32 and text


def test_disconnect_frees_the_engine(real_app: AppProcess) -> None:
    h = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", real_app.url + "/v1/completions", headers=h, timeout=60,
                      json={"prompt": "Tell a long story", "max_tokens": 1500, "stream": True,
                            "ignore_eos": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break
    deadline = time.time() + 3
    while time.time() < deadline:
        health = httpx.get(real_app.url + "/health").json()
        if health["slots_processing"] == 0:
            break
        time.sleep(0.05)
    assert health["slots_processing"] == 0, health


SEQUENCES = [
    ("1, 2, 3, 4, 5,", " 6, 7, 8"),
    ("A, B, C, D, E,", " F, G, H"),
    ("Monday, Tuesday, Wednesday,", " Thursday, Friday"),
    ("January, February, March,", " April, May, June"),
    ("10, 20, 30, 40,", " 50, 60, 70"),
    ("a b c d e f", " g h i j k"),
]


def test_many_concurrent_streams_are_never_mixed_or_cut(client: openai.OpenAI) -> None:
    """Twelve concurrent streams on 4 sequences (the rest queue): each continues its own sequence, in full."""
    results = concurrent_streams(client, [SEQUENCES[i % len(SEQUENCES)][0] for i in range(12)], 12)
    assert sorted(results) == list(range(12))
    for i, (text, reason, n) in results.items():
        expected = SEQUENCES[i % len(SEQUENCES)][1]
        assert text.startswith(expected), (i, text)  # its own continuation: nothing from another stream
        assert reason == "length" and n == 12  # and not cut short


def test_a_growing_chat_reuses_its_prefix(client: openai.OpenAI) -> None:
    history = [{"role": "system", "content": "You are a terse assistant. " * 20},
               {"role": "user", "content": "Name a colour."}]
    first = client.chat.completions.create(model="g", messages=history, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    history += [{"role": "assistant", "content": first.choices[0].message.content or "red"},
                {"role": "user", "content": "Another one?"}]
    second = client.chat.completions.create(model="g", messages=history, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    assert first.usage is not None and second.usage is not None
    details = second.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    assert details.cached_tokens >= first.usage.prompt_tokens - 2  # the whole earlier prompt came from the cache


def test_disconnect_during_the_prompt_frees_the_sequence(real_app: AppProcess) -> None:
    h = {"Authorization": f"Bearer {API_KEY}"}
    prompt = "The history of the city is long and full of surprising turns. " * 45  # ~600 tokens, 2 chunks
    began = time.time()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(real_app.url + "/v1/completions", headers=h, timeout=0.3,
                   json={"prompt": prompt, "max_tokens": 400, "ignore_eos": True})
    # Uncancelled, the prompt and 400 tokens take ~7 s here; cancelled, the next chunk boundary ends it.
    health = httpx.get(real_app.url + "/health").json()
    while health["slots_processing"] and time.time() - began < 3.0:
        time.sleep(0.05)
        health = httpx.get(real_app.url + "/health").json()
    assert health["slots_processing"] == 0, health
    out = httpx.post(real_app.url + "/v1/completions", headers=h, json={"prompt": "Hi", "max_tokens": 2})
    assert out.status_code == 200


def test_the_readme_client_example_runs(real_app: AppProcess, capsys: pytest.CaptureFixture[str]) -> None:
    import re as _re

    from tests.conftest import REPO

    readme = (REPO / "README.md").read_text()
    block = next(b for b in _re.findall(r"```python\n(.*?)```", readme, _re.S) if "OpenAI(" in b)
    code = block.replace("http://localhost:8080/v1", real_app.url + "/v1").replace("<the logged key>", API_KEY)
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()  # it printed the model's reply
