"""Small pure units: configuration layering, stop-string streaming, GGUF checks."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from app import config as cfg
from app.engine.text import TextStream
from app.main import build_parser, resolve_config
from app.model_source import ModelSourceError, inspect_gguf, kind_of


def test_config_layers_defaults_file_cli(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"model": "a/b/c.gguf", "n_ctx": 1024, "parallel": 2}))
    args = build_parser().parse_args(["--config", str(f), "--n-ctx", "2048", "--embeddings"])
    conf = resolve_config(args)
    assert conf.model == "a/b/c.gguf"  # from the file
    assert conf.parallel == 2  # from the file
    assert conf.n_ctx == 2048  # CLI beats the file
    assert conf.embeddings is True
    assert conf.port == 8080  # default


def test_config_accepts_sectioned_export_format(tmp_path: Path) -> None:
    doc = cfg.to_document(cfg.AppConfig(model="demo", api_key="secret", n_gpu_layers=0), include_secrets=True)
    f = tmp_path / "export.json"
    f.write_text(json.dumps(doc))
    conf = cfg.build(cfg.load_json(f))
    assert conf.api_key == "secret" and conf.n_gpu_layers == 0 and conf.model == "demo"


def test_masked_export_hides_secrets() -> None:
    doc = cfg.to_document(cfg.AppConfig(model="demo", api_key="secret", hf_token="hf_x"))
    assert doc["format_version"] == 1
    assert doc["General"]["hf_token"] == "***" and doc["Advanced Options"]["api_key"] == "***"


@pytest.mark.parametrize("values,field", [
    ({"n_ctx": "lots"}, "n_ctx"),
    ({"port": 70000}, "port"),
    ({"chat_format": "klingon"}, "chat_format"),
    ({"idle_time_limit_hours": -1}, "idle_time_limit_hours"),
    ({"mystery": 1}, "mystery"),
])
def test_bad_config_is_one_line_naming_the_field(values: dict, field: str) -> None:
    with pytest.raises(cfg.ConfigError) as err:
        cfg.build(values)
    message = str(err.value)
    assert "\n" not in message and field in message


def test_strings_from_clearml_are_cast() -> None:
    flat = cfg.from_strings({"General/n_gpu_layers": "12", "Advanced Options/embeddings": "true",
                             "Advanced Options/idle_time_limit_hours": "0.5", "Advanced Options/port": ""})
    conf = cfg.build({"model": "demo", **flat})
    assert conf.n_gpu_layers == 12 and conf.embeddings is True and conf.idle_time_limit_hours == 0.5
    assert conf.port == 8080
    with pytest.raises(cfg.ConfigError, match="n_gpu_layers"):
        cfg.build(cfg.from_strings({"General/n_gpu_layers": "1.5"}))


def test_help_describes_every_field() -> None:
    text = build_parser().format_help()
    for name in cfg.field_names():
        assert "--" + name.replace("_", "-") in text


@pytest.mark.parametrize("pieces,stop,expected,stopped", [
    (["Hel", "lo ", "wor", "ld"], [], "Hello world", False),
    (["a", "bS", "TO", "Pc"], ["STOP"], "ab", True),
    (["a", "ST", "x"], ["STOP"], "aSTx", False),
    (["x<|im", "_end|>tail"], ["<|im_end|>"], "x", True),
])
def test_text_stream_holds_back_stop_prefixes(pieces: list[str], stop: list[str], expected: str,
                                              stopped: bool) -> None:
    s = TextStream(stop)
    out = "".join(s.push(p.encode()) for p in pieces)
    out += s.flush()
    assert out == expected and s.stopped == stopped


def test_text_stream_completes_split_utf8() -> None:
    s = TextStream([])
    data = "héllo 🙂".encode()
    out = "".join(s.push(data[i:i + 1]) for i in range(len(data))) + s.flush()
    assert out == "héllo 🙂"


def write_tiny_gguf(path: Path, rows: int = 8) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(128)
    w.add_file_type(1)
    w.add_tensor("token_embd.weight", np.zeros((rows, 16), dtype=np.float16))
    w.add_tensor("output.weight", np.ones((8, 16), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_inspect_tiny_gguf(tmp_path: Path) -> None:
    p = tmp_path / "tiny.gguf"
    write_tiny_gguf(p)
    info = inspect_gguf(str(p))
    assert info.architecture == "llama" and info.context_length == 128 and info.quantization == "F16"
    assert info.parameters == 256


def test_truncated_and_foreign_files_fail_with_one_line(tmp_path: Path) -> None:
    p = tmp_path / "tiny.gguf"
    write_tiny_gguf(p)
    data = p.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 40])
    with pytest.raises(ModelSourceError, match="truncated"):
        inspect_gguf(str(cut))
    header_cut = tmp_path / "header.gguf"
    header_cut.write_bytes(data[:30])
    with pytest.raises(ModelSourceError, match="not a readable GGUF"):
        inspect_gguf(str(header_cut))
    html = tmp_path / "page.gguf"
    html.write_text("<html>not found</html>")
    with pytest.raises(ModelSourceError, match="not a GGUF file"):
        inspect_gguf(str(html))


def test_inspect_demo_model(demo_model: str) -> None:
    info = inspect_gguf(demo_model)
    assert info.architecture == "gemma3" and info.quantization == "Q4_K_M" and info.context_length == 32768


@pytest.mark.parametrize("spec,kind", [
    ("demo", "demo"), ("/models/x.gguf", "local"), ("file:///x.gguf", "local"),
    ("https://host/x.gguf", "url"), ("s3://bucket/x.gguf", "url"),
    ("0123456789abcdef0123456789abcdef", "clearml"), ("unsloth/gemma-3-GGUF/gemma-3-Q4_K_M.gguf", "huggingface"),
])
def test_model_spec_kinds(spec: str, kind: str) -> None:
    assert kind_of(spec) == kind


def test_readme_config_table_is_current() -> None:
    from scripts.config_table import table

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert table() in readme


def test_shipped_configs_are_valid() -> None:
    for path in (Path(__file__).resolve().parent.parent / "configs").glob("*.json"):
        cfg.build(cfg.load_json(path))


def test_idle_clock_starts_at_readiness_and_pauses_in_flight() -> None:
    from app.telemetry.stats import RequestStats

    now = [100.0]
    stats = RequestStats(clock=lambda: now[0])
    now[0] = 160.0  # a minute of loading
    stats.restart_idle_clock()
    assert stats.idle_seconds() == 0.0
    now[0] = 170.0
    assert stats.idle_seconds() == 10.0
    started = stats.begin()
    now[0] = 500.0
    assert stats.idle_seconds() == 0.0  # a long request in flight is activity
    stats.end("/v1/completions", 200, started)
    now[0] = 505.0
    assert stats.idle_seconds() == 5.0


def test_rpc_devices_match_their_endpoint_exactly() -> None:
    from app.engine.rpc import Device, rpc_devices

    listed = [Device("CPU", "cpu", 1, 1), Device("RPC0", "10.0.0.1:50052", 1, 1), Device("RPC1", "10.0.0.1:5005", 1, 1)]
    assert [d.name for d in rpc_devices(["10.0.0.1:5005"], listed)] == ["RPC1"]  # not its prefix twin RPC0
    assert [d.name for d in rpc_devices(["10.0.0.1:50052", "10.0.0.1:5005"], listed)] == ["RPC0", "RPC1"]
    assert rpc_devices(["10.0.0.1:505"], listed) == []
