"""The Hugging Face model source: the real huggingface_hub client against a local double of the Hub."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import openai
import pytest

from app.model_source import ModelSourceError, fetch, inspect_gguf
from tests.conftest import API_KEY, AppProcess
from tests.fake_hub import FakeHub, RunningHub
from tests.test_units import write_tiny_gguf

TOKEN = "hf_GATEDtoken_never_logged_987"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningHub]:
    fake = FakeHub()
    tiny = tmp_path / "tiny.gguf"
    write_tiny_gguf(tiny)
    fake.add("org/public", "tiny.gguf", tiny)
    fake.add("org/public", "sub/dir/tiny.gguf", tiny)
    fake.add("org/gated", "tiny.gguf", tiny)
    fake.gated["org/gated"] = TOKEN
    for i in (1, 2):
        part = tmp_path / f"part{i}.gguf"
        write_tiny_gguf(part, rows=8 * i)  # distinct contents: the Hub cache stores blobs by ETag
        fake.add("org/split", f"big-0000{i}-of-00002.gguf", part)
    big = tmp_path / "big.gguf"
    # 24 MiB: broken off halfway, more than one of huggingface_hub's 10 MiB chunks is already on disk.
    write_tiny_gguf(big, rows=786432)
    fake.add("org/public", "big.gguf", big)
    page = tmp_path / "page.html"
    page.write_text("<html>Sign in to continue</html>")
    fake.add("org/public", "notreally.gguf", page)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with fake.serve() as running:
        monkeypatch.setenv("HF_ENDPOINT", running.url)
        yield running


def test_download_then_cache_hit(hub: RunningHub) -> None:
    first = fetch("org/public/sub/dir/tiny.gguf")
    assert inspect_gguf(first).architecture == "llama"
    assert "hf-cache" in first
    again = fetch("org/public/sub/dir/tiny.gguf")
    assert again == first
    assert len(hub.hub.gets("sub/dir/tiny.gguf")) == 1  # the second fetch was served from the cache


def test_gated_repo_needs_the_token_and_never_logs_it(hub: RunningHub, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ModelSourceError) as err:
        fetch("org/gated/tiny.gguf")
    assert "\n" not in str(err.value) and "GatedRepoError" in str(err.value)
    heads = [r for r in hub.hub.requests if r.method == "HEAD"]
    assert len(heads) == 1  # a refusal is final: no retries
    path = fetch("org/gated/tiny.gguf", hf_token=TOKEN)
    assert inspect_gguf(path).architecture == "llama"
    assert hub.hub.gets("tiny.gguf")[-1].authorization == f"Bearer {TOKEN}"
    assert TOKEN not in caplog.text


def test_interrupted_download_resumes(hub: RunningHub) -> None:
    hub.hub.cut_first_get.add("big.gguf")
    path = fetch("org/public/big.gguf")
    inspect_gguf(path)  # complete and valid
    gets = hub.hub.gets("big.gguf")
    assert len(gets) == 2
    assert gets[0].range is None and gets[1].range is not None and gets[1].range.startswith("bytes=")


def test_split_sets_fetch_every_part(hub: RunningHub) -> None:
    path = fetch("org/split/big-00001-of-00002.gguf")
    assert path.endswith("big-00001-of-00002.gguf")
    assert Path(path).with_name("big-00002-of-00002.gguf").exists()
    assert len(hub.hub.gets("big-00002-of-00002.gguf")) == 1


def test_missing_file_and_non_gguf(hub: RunningHub) -> None:
    with pytest.raises(ModelSourceError, match="RemoteEntryNotFoundError"):
        fetch("org/public/absent.gguf")
    path = fetch("org/public/notreally.gguf")
    with pytest.raises(ModelSourceError, match="not a GGUF file"):
        inspect_gguf(path)


def test_unreachable_hub_is_retried_then_fails_in_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr("app.model_source.time.sleep", lambda s: None)
    with pytest.raises(ModelSourceError) as err:
        fetch("org/public/tiny.gguf")
    assert "\n" not in str(err.value)


def test_app_serves_a_gated_hub_model_end_to_end(tmp_path: Path, demo_model: str) -> None:
    fake = FakeHub()
    fake.add("google/gemma-3-270m-GGUF", "gemma-3-270m-q4_k_m.gguf", Path(demo_model))
    fake.gated["google/gemma-3-270m-GGUF"] = TOKEN
    with fake.serve() as running:
        app = AppProcess(["--offline", "--model", "google/gemma-3-270m-GGUF/gemma-3-270m-q4_k_m.gguf",
                          "--hf-token", TOKEN, "--port", "0", "--api-key", API_KEY, "--idle-time-limit-hours", "0"],
                         env={"CLEARML_CACHE_DIR": str(tmp_path / "clearml"), "HF_ENDPOINT": running.url,
                              "HF_HOME": str(tmp_path / "hf")}).start()
        try:
            app.wait_ready()
            client = openai.OpenAI(base_url=app.url + "/v1", api_key=API_KEY, max_retries=0)
            assert [m.id for m in client.models.list().data] == ["gemma-3-270m-q4_k_m.gguf"]
            out = client.completions.create(model="g", prompt="The capital of France is", max_tokens=4)
            assert out.choices[0].text
        finally:
            app.stop()
    assert any("% of" in line for line in app.lines), "no download progress in the console"
    assert TOKEN not in app.log
    assert all(r.authorization == f"Bearer {TOKEN}" for r in fake.requests)


def test_a_full_disk_fails_at_once_with_one_line(hub: RunningHub, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import huggingface_hub.file_download as fd

    real_http_get = fd.http_get
    calls = []

    def disk_full_once(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_http_get(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fd, "http_get", disk_full_once)
    with pytest.raises(ModelSourceError) as err:
        fetch("org/public/big.gguf")
    assert "No space left on device" in str(err.value) and "\n" not in str(err.value)
    assert len(calls) == 1  # a full disk is not retried
    # Nothing half-written is taken for the model: the next run downloads it whole and it checks out.
    path = fetch("org/public/big.gguf")
    assert inspect_gguf(path).architecture == "llama"
