"""A ClearML model ID as the model source: the real SDK against tests/clearml_double.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.clearml.storage import ClearMLStorage
from app.model_source import ModelSourceError, fetch, inspect_gguf
from tests.clearml_double import ClearMLDouble, RunningDouble
from tests.test_units import write_tiny_gguf

MODEL_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def double(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningDouble]:
    with ClearMLDouble().serve() as running:
        tiny = tmp_path / "tiny-model.gguf"
        write_tiny_gguf(tiny)
        running.double.add_model(MODEL_ID, "tiny", tiny, running.url)
        for key, value in running.double.env(running.url).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr("app.model_source.time.sleep", lambda s: None)
        yield running


def test_model_id_downloads_the_file_once(double: RunningDouble) -> None:
    path = fetch(MODEL_ID, store=ClearMLStorage())
    assert inspect_gguf(path).architecture == "llama"
    assert Path(path).name.endswith("tiny-model.gguf")  # in ClearML's cache, under a hashed prefix
    downloads = double.double.endpoints().count("files.download")
    assert downloads >= 1
    again = fetch(MODEL_ID, store=ClearMLStorage())
    assert again == path
    endpoints = double.double.endpoints()
    assert "models.get_by_id" in endpoints
    assert endpoints.count("files.download") == downloads  # the second fetch came from ClearML's cache
    asked = [c.body for c in double.double.calls if c.endpoint == "models.get_by_id"]
    assert asked and all(b["model"] == MODEL_ID for b in asked)


def test_unknown_model_id_fails_with_one_line(double: RunningDouble) -> None:
    with pytest.raises(ModelSourceError) as err:
        fetch("ffffffffffffffffffffffffffffffff", store=ClearMLStorage())
    assert "\n" not in str(err.value)
    assert "ffffffffffffffffffffffffffffffff" in str(err.value)


def test_http_url_through_the_storage_manager(double: RunningDouble) -> None:
    url = f"{double.url}/files/tiny-model.gguf"
    path = fetch(url, store=ClearMLStorage())
    assert inspect_gguf(path).architecture == "llama"
    assert fetch(url, store=ClearMLStorage()) == path
    with pytest.raises(ModelSourceError) as err:
        fetch(f"{double.url}/files/absent.gguf", store=ClearMLStorage())
    assert "\n" not in str(err.value)
