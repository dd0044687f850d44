"""Context that fits the work: the KV cache arithmetic with numbers, the memory settings' validation, the values
they set on llama.cpp's parameters, and real loads of the demo model (auto context, a quantized cache, a refusal).
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import sys
from pathlib import Path

import llama_cpp
import psutil
import pytest

from app import config as cfg
from app.engine import memory, params
from app.engine.memory import ContextMemoryError, GiB, KVShape, MemoryBudget, MiB, choose_context
from app.engine.model import LlamaModel
from app.engine.settings import EngineSettings
from app.main import build_parser, resolve_config
from tests.conftest import REPO

# Gemma 3 270M (the demo model): 18 layers, 1 KV head, key_length = value_length = 256, trained on 32,768.
DEMO = KVShape(n_layer=18, n_head_kv=1, head_dim_k=256, head_dim_v=256)
DEMO_F16_PER_TOKEN = 18 * 1 * (256 * 2 + 256 * 2)  # 18,432 bytes


# --- the arithmetic ----------------------------------------------------------------------------------------

def test_kv_bytes_of_the_demo_model() -> None:
    assert DEMO.bytes_per_token("f16", "f16") == DEMO_F16_PER_TOKEN
    assert DEMO.cache_bytes(32768, "f16", "f16") == 576 * MiB  # the default context's cache
    assert DEMO.bytes_per_token("q8_0", "f16") == 18 * (256 * 34 / 32 + 256 * 2)  # K and V sized apart


@pytest.mark.parametrize("cache_type,per_element", [
    ("f32", 4), ("f16", 2), ("bf16", 2), ("q8_0", 34 / 32), ("q4_0", 18 / 32), ("q4_1", 20 / 32),
    ("q5_0", 22 / 32), ("q5_1", 24 / 32), ("iq4_nl", 18 / 32),
])
def test_cache_type_sizes(cache_type: str, per_element: float) -> None:
    assert memory.CACHE_TYPE_BYTES[cache_type] == per_element
    assert DEMO.cache_bytes(1024, cache_type, cache_type) == pytest.approx(18 * 512 * per_element * 1024, abs=1)
    assert memory.is_quantized(cache_type) == (cache_type not in ("f32", "f16", "bf16"))


def test_head_dims_from_metadata_else_embedding_over_heads() -> None:
    assert memory.head_dims(640, 4, 256, 256) == (256, 256)  # Gemma 3 states them (not 640 / 4)
    assert memory.head_dims(4096, 32, None, None) == (128, 128)  # Llama: n_embd / n_head
    assert memory.head_dims(4096, 32, 192, None) == (192, 128)
    assert memory.head_dims(0, 0, None, None) == (0, 0)


def test_the_margin_is_512_mib_or_a_tenth() -> None:
    assert MemoryBudget("available RAM", 2 * GiB).margin == 512 * MiB
    assert MemoryBudget("available RAM", 20 * GiB).margin == 2 * GiB
    budget = MemoryBudget("available RAM", 20 * GiB, weights=1 * GiB, reserved=256 * MiB)
    assert budget.usable == 20 * GiB - 1 * GiB - 256 * MiB - 2 * GiB
    assert MemoryBudget("available RAM", 100 * MiB).usable == 0


def test_auto_takes_the_trained_context_when_it_fits() -> None:
    choice = choose_context(0, 32768, DEMO, "f16", "f16", MemoryBudget("available RAM", 20 * GiB))
    assert (choice.n_ctx, choice.reason, choice.kv_bytes) == (32768, "the model's trained context", 576 * MiB)
    assert choice.describe() == ("context: 32768 tokens (the model's trained context); KV cache 576 MiB "
                                 "(f16/f16) of 20.0 GiB available RAM")


def test_auto_is_capped_by_memory_and_rounded_down_to_256() -> None:
    budget = MemoryBudget("available RAM", 1 * GiB)  # usable: 1 GiB less the 512 MiB margin
    choice = choose_context(0, 32768, DEMO, "f16", "f16", budget)
    assert 512 * MiB // DEMO_F16_PER_TOKEN == 29127  # fits; the cut lands on a multiple of 256 below it
    assert choice.n_ctx == 28928 and choice.n_ctx % 256 == 0
    assert choice.reason == "capped by memory: the model's trained context is 32768"
    assert choice.kv_bytes == 28928 * DEMO_F16_PER_TOKEN <= budget.usable
    # A quantized cache holds more in the same memory: the trained context fits again.
    assert choose_context(0, 32768, DEMO, "q8_0", "q8_0", budget).n_ctx == 32768


def test_auto_without_a_stated_trained_context_aims_at_4096() -> None:
    choice = choose_context(0, 0, DEMO, "f16", "f16", MemoryBudget("available RAM", 20 * GiB))
    assert choice.n_ctx == memory.DEFAULT_CTX == 4096
    assert "does not state its trained context" in choice.reason


def test_auto_stops_at_the_apps_limit() -> None:
    choice = choose_context(0, 2 * memory.MAX_N_CTX, DEMO, "q4_0", "q4_0", MemoryBudget("available RAM", 64 * GiB))
    assert choice.n_ctx == memory.MAX_N_CTX and "trained context is 2097152" in choice.reason


def test_an_explicit_context_is_honoured_when_it_fits() -> None:
    budget = MemoryBudget("free VRAM on GPU 0", 20 * GiB)
    assert choose_context(1000, 32768, DEMO, "f16", "f16", budget).n_ctx == 1000  # not rounded
    beyond = choose_context(65536, 32768, DEMO, "f16", "f16", budget)
    assert beyond.n_ctx == 65536 and beyond.reason == "as configured, beyond the model's trained 32768"


def test_an_explicit_context_that_does_not_fit_names_the_one_that_would() -> None:
    budget = MemoryBudget("available RAM", 1 * GiB, weights=100 * MiB)  # usable 412 MiB
    with pytest.raises(ContextMemoryError) as err:
        choose_context(65536, 32768, DEMO, "f16", "f16", budget)
    message = str(err.value)
    fits = 412 * MiB // DEMO_F16_PER_TOKEN // 256 * 256
    assert fits == 23296
    assert "\n" not in message
    assert message.startswith("n_ctx 65536 needs a 1.1 GiB KV cache (f16/f16) but 1.0 GiB available RAM leaves "
                              "412 MiB after the 100 MiB model and a 512 MiB safety margin: at most 23296 tokens "
                              "fit")
    # The number it names does fit.
    assert choose_context(fits, 32768, DEMO, "f16", "f16", budget).n_ctx == fits


def test_auto_refuses_when_not_even_256_tokens_fit() -> None:
    with pytest.raises(ContextMemoryError, match="not even 256 tokens"):
        choose_context(0, 32768, DEMO, "f16", "f16", MemoryBudget("free VRAM on GPU 0", 514 * MiB))  # 2 MiB usable


def test_a_model_without_a_kv_cache_fits_any_context() -> None:
    recurrent = KVShape(n_layer=24, n_head_kv=0, head_dim_k=0, head_dim_v=0)
    assert choose_context(0, 1 << 30, recurrent, "f16", "f16", MemoryBudget("available RAM", 0)).n_ctx \
        == memory.MAX_N_CTX


def test_the_gpus_that_hold_the_cache() -> None:
    assert memory.devices_used(2, "layer", 0, ()) == [0, 1]
    assert memory.devices_used(2, "row", 0, ()) == [0, 1]
    assert memory.devices_used(3, "layer", 0, (3.0, 0.0, 1.0)) == [0, 2]
    assert memory.devices_used(2, "none", 1, ()) == [1]
    assert memory.devices_used(1, "none", 1, ()) == []  # main_gpu not visible: no GPU budget
    assert memory.devices_used(0, "layer", 0, ()) == []


def test_format_bytes() -> None:
    assert memory.format_bytes(576 * MiB) == "576 MiB"
    assert memory.format_bytes(20.3 * GiB) == "20.3 GiB"


# --- the configuration -------------------------------------------------------------------------------------

def test_defaults() -> None:
    c = cfg.AppConfig()
    assert (c.n_ctx, c.cache_type_k, c.cache_type_v, c.flash_attn) == (0, "f16", "f16", "auto")
    assert (c.split_mode, c.tensor_split, c.main_gpu, c.n_cpu_moe, c.parallel) == ("layer", "", 0, 0, 4)
    assert "raise it on a GPU" in cfg.field_description("parallel")


@pytest.mark.parametrize("values,words", [
    ({"cache_type_k": "q3_k"}, ["cache_type_k", "f32, f16, bf16, q8_0"]),
    ({"cache_type_v": "int8"}, ["cache_type_v", "must be one of"]),
    ({"flash_attn": "maybe"}, ["flash_attn", "auto, on, off"]),
    ({"cache_type_v": "q8_0", "flash_attn": "off"}, ["cache_type_v q8_0 needs flash attention"]),
    ({"cache_type_v": "q4_0", "cache_type_k": "q4_0", "flash_attn": "off"}, ["flash_attn to auto or on"]),
    ({"split_mode": "diagonal"}, ["split_mode", "none, layer, row"]),
    ({"tensor_split": "3,x"}, ["tensor_split", "'x' is not a number"]),
    ({"tensor_split": "3,-1"}, ["tensor_split", "'-1' is not a non-negative share"]),
    ({"tensor_split": "0,0"}, ["tensor_split", "at least one share must be positive"]),
    ({"tensor_split": ",".join(["1"] * 17)}, ["tensor_split", "17 shares for at most 16 GPUs"]),
    ({"main_gpu": 16}, ["main_gpu"]),
    ({"n_cpu_moe": 10000}, ["n_cpu_moe"]),
    ({"n_ctx": 32}, ["n_ctx", "0 (auto) or at least 64"]),
    ({"n_ctx": 256, "n_batch": 512}, ["n_batch (512) must not exceed n_ctx (256)"]),
])
def test_bad_memory_settings_are_one_line(values: dict[str, object], words: list[str]) -> None:
    with pytest.raises(cfg.ConfigError) as err:
        cfg.build(values)
    assert "\n" not in str(err.value)
    assert all(word in str(err.value) for word in words), str(err.value)


def test_good_memory_settings_are_normalised_and_reach_the_engine() -> None:
    c = cfg.build({"cache_type_k": "Q8_0", "cache_type_v": " q4_0 ", "flash_attn": "ON", "split_mode": "Row",
                   "tensor_split": " 3, 1 ", "main_gpu": 1, "n_cpu_moe": 9999})
    assert (c.cache_type_k, c.cache_type_v, c.flash_attn, c.split_mode, c.tensor_split) == \
        ("q8_0", "q4_0", "on", "row", "3,1")
    s = c.engine_settings("/m.gguf", "m")
    assert (s.cache_type_k, s.cache_type_v, s.flash_attn, s.split_mode, s.tensor_split, s.main_gpu, s.n_cpu_moe) \
        == ("q8_0", "q4_0", "on", "row", (3.0, 1.0), 1, 9999)
    assert cfg.build({"cache_type_k": "q8_0", "flash_attn": "off"}).cache_type_k == "q8_0"  # only V needs it
    assert cfg.AppConfig().engine_settings("/m.gguf", "m").tensor_split == ()


def test_auto_context_lifts_the_per_sequence_and_batch_checks() -> None:
    assert cfg.build({"n_ctx": 0, "n_batch": 8192}).n_batch == 8192  # capped to the chosen context at load
    assert cfg.build({"n_ctx": 4096, "parallel": 256, "n_batch": 256}).parallel == 256  # one request may use all


def test_memory_settings_come_from_flags_and_hyperparameters() -> None:
    args = build_parser().parse_args(["--model", "demo", "--cache-type-k", "q8_0", "--cache-type-v", "q8_0",
                                      "--flash-attn", "on", "--split-mode", "none", "--tensor-split", "1,1",
                                      "--main-gpu", "1", "--n-cpu-moe", "12"])
    c = resolve_config(args)
    assert (c.cache_type_v, c.flash_attn, c.split_mode, c.tensor_split, c.main_gpu, c.n_cpu_moe) == \
        ("q8_0", "on", "none", "1,1", 1, 12)
    flat = cfg.from_strings({"Advanced Options/n_ctx": "0", "Advanced Options/cache_type_v": "q8_0",
                             "Advanced Options/flash_attn": "auto", "Advanced Options/n_cpu_moe": "9999",
                             "Advanced Options/tensor_split": ""})
    c = cfg.build(flat)
    assert (c.n_ctx, c.cache_type_v, c.n_cpu_moe, c.tensor_split) == (0, "q8_0", 9999, "")
    assert all(cfg.field_section(n) == cfg.ADVANCED for n in ("cache_type_k", "flash_attn", "n_cpu_moe"))


# --- the parameters llama.cpp gets -----------------------------------------------------------------------------

def settings(**overrides: object) -> EngineSettings:
    return cfg.build({"n_ctx": 1024, "n_batch": 256, **overrides}).engine_settings("/m.gguf", "m")


def test_context_params_carry_the_cache_types_and_flash_attention() -> None:
    p = params.context_params(settings(cache_type_k="q8_0", cache_type_v="q4_0", flash_attn="on"), 2048, 256)
    assert (p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max) == (2048, 256, 256, 4)
    assert (p.type_k, p.type_v) == (llama_cpp.GGML_TYPE_Q8_0, llama_cpp.GGML_TYPE_Q4_0)
    assert p.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    assert p.kv_unified and p.swa_full
    off = params.context_params(settings(flash_attn="off"), 1024, 256)
    assert off.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED and off.type_v == llama_cpp.GGML_TYPE_F16
    auto = params.context_params(settings(), 1024, 256)
    assert auto.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO


def test_every_cache_type_maps_to_the_ggml_type_of_that_name() -> None:
    base = next(p for p in params.ggml_libraries() if "ggml-base" in p.name)
    type_name = ctypes.CDLL(str(base)).ggml_type_name
    type_name.restype = ctypes.c_char_p
    type_name.argtypes = [ctypes.c_int]
    for name, value in params.GGML_TYPES.items():
        assert type_name(value).decode() == name  # bf16 included, which llama-cpp-python does not export


def test_model_params_carry_the_gpu_placement() -> None:
    built = params.model_params(settings(n_gpu_layers=20, split_mode="row", main_gpu=1, tensor_split="3,1"))
    p = built.params
    assert (p.n_gpu_layers, p.split_mode, p.main_gpu) == (20, llama_cpp.LLAMA_SPLIT_MODE_ROW, 1)
    assert [p.tensor_split[i] for i in range(llama_cpp.llama_max_devices())] == [3.0, 1.0] + [0.0] * 14
    assert not p.tensor_buft_overrides  # n_cpu_moe 0: no overrides
    plain = params.model_params(settings()).params
    assert not plain.tensor_split and plain.split_mode == llama_cpp.LLAMA_SPLIT_MODE_LAYER


def test_n_cpu_moe_becomes_one_null_terminated_override_to_the_cpu_buffer_type() -> None:
    built = params.model_params(settings(n_cpu_moe=3))
    entries = (params.TensorBuftOverride * 2).from_address(built.params.tensor_buft_overrides)
    assert entries[0].pattern == rb"blk\.([0-1]|2)\.ffn_(up|down|gate_up|gate)_(ch|)exps"
    assert entries[0].buft == params.cpu_buffer_type() and entries[0].buft
    assert entries[1].pattern is None and entries[1].buft is None  # the end of the list
    every_layer = params.model_params(settings(n_cpu_moe=9999))  # held: the entries live in its C memory
    every = (params.TensorBuftOverride * 1).from_address(every_layer.params.tensor_buft_overrides)
    assert every[0].pattern == rb"\.ffn_(up|down|gate_up|gate)_(ch|)exps"


@pytest.mark.parametrize("n", [*range(1, 125), 999, 1000, 1001, 4711, 9998])
def test_the_layer_range_regex_matches_exactly_the_first_n(n: int) -> None:
    import re

    numbers = re.compile(f"(?:{params.below(n)})")
    assert [k for k in range(n + 150) if numbers.fullmatch(str(k))] == list(range(n))
    assert len(params.below(n).split("|")) <= 12  # a few branches, not one per layer


# --- the real model ------------------------------------------------------------------------------------------

def load(demo_model: str, **values: object) -> LlamaModel:
    return LlamaModel(cfg.build({"n_batch": 256, **values}).engine_settings(demo_model, "demo"))


def test_auto_context_on_the_demo_model_is_its_trained_context(demo_model: str,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    if psutil.virtual_memory().available < 2 * GiB:
        pytest.skip("the trained context's 576 MiB cache needs about 2 GiB of available RAM")
    caplog.set_level(logging.INFO, logger="app.engine.model")
    model = load(demo_model, n_ctx=0, n_batch=512)
    try:
        assert model.n_ctx == 32768 and model.n_batch == 512
        info = model.context_info
        assert {k: info[k] for k in ("n_ctx", "n_ctx_train", "reason", "type_k", "type_v", "flash_attn",
                                     "kv_bytes")} == {
            "n_ctx": 32768, "n_ctx_train": 32768, "reason": "the model's trained context", "type_k": "f16",
            "type_v": "f16", "flash_attn": "auto", "kv_bytes": 576 * MiB}
        assert info["memory"].endswith("GiB available RAM")
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("context: ")]
        assert len(lines) == 1 and lines[0].startswith(
            "context: 32768 tokens (the model's trained context); KV cache 576 MiB (f16/f16) of ")
    finally:
        model.close()


def test_the_shape_read_from_the_demo_model(demo_model: str) -> None:
    model = load(demo_model, n_ctx=256)
    try:
        assert model.kv_shape() == DEMO
    finally:
        model.close()


def test_auto_context_is_capped_by_the_memory_it_finds(demo_model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model_file = os.path.getsize(demo_model)
    monkeypatch.setattr("app.engine.model.available_ram", lambda: 768 * MiB + model_file)  # 256 MiB usable
    model = load(demo_model, n_ctx=0, n_batch=512)
    try:
        assert model.n_ctx == 256 * MiB // DEMO_F16_PER_TOKEN // 256 * 256 == 14336
        assert model.context_info["reason"] == "capped by memory: the model's trained context is 32768"
    finally:
        model.close()


def test_a_quantized_cache_with_flash_attention_loads(demo_model: str) -> None:
    model = load(demo_model, n_ctx=1024, cache_type_k="q8_0", cache_type_v="q8_0", flash_attn="on")
    try:
        info = model.context_info
        assert (info["type_k"], info["type_v"], info["flash_attn"]) == ("q8_0", "q8_0", "on")
        assert info["kv_bytes"] == DEMO.cache_bytes(1024, "q8_0", "q8_0") == 9792 * 1024
        tokens = model.tokenize("The capital of France is")
        ids = (llama_cpp.llama_token * len(tokens))(*tokens)  # held: the batch points into it
        batch = llama_cpp.llama_batch_get_one(ids, len(tokens))
        assert llama_cpp.llama_decode(model.ctx, batch) == 0  # the quantized cache is written and read
    finally:
        model.close()


def test_an_explicit_context_beyond_memory_is_refused_naming_what_fits(demo_model: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("app.engine.model.available_ram", lambda: 2 * GiB)
    with pytest.raises(ContextMemoryError) as err:
        load(demo_model, n_ctx=262144)
    message = str(err.value)
    assert message.startswith("n_ctx 262144 needs a 4.5 GiB KV cache (f16/f16) but 2.0 GiB available RAM")
    assert "at most " in message and "\n" not in message
    fits = int(message.split("at most ")[1].split()[0])
    assert 0 < fits < 262144 and fits % 256 == 0


@pytest.mark.skipif(psutil.virtual_memory().available > 30 * GiB, reason="36 GiB of f32 cache might fit here")
def test_the_app_fails_at_load_with_the_one_line_cause(tmp_path: Path) -> None:
    """Real memory, the real app: a 1M-token f32 cache (36 GiB) is a model load failure naming what fits."""
    from tests.conftest import AppProcess

    app = AppProcess(["--offline", "--port", "0", "--model", "demo", "--n-ctx", "1048576", "--cache-type-k", "f32",
                      "--cache-type-v", "f32"], env={"CLEARML_CACHE_DIR": str(tmp_path)})
    app.start().wait_exit(120)
    assert app.proc is not None and app.proc.returncode == 1, app.log
    failure = [line for line in app.lines if "model load failed: n_ctx 1048576 needs a 36.0 GiB KV cache" in line]
    assert len(failure) == 1 and "tokens fit" in failure[0], app.log
    assert "Traceback" not in app.log


def test_embeddings_keep_their_context_bounded_under_auto(demo_model: str) -> None:
    model = LlamaModel(cfg.build({"n_ctx": 0, "embeddings": True}).engine_settings(demo_model, "demo"))
    try:
        assert model.n_ctx == 32768 and model.embed_n_ctx == 8192  # 32768 would reserve 36 GiB of compute
    finally:
        model.close()


N_CPU_MOE_PROBE = """
import sys
import app.engine.params as params
params.MOE_EXPERTS = r"\\.ffn_down"  # the demo model has no experts: stand in a tensor it has
from app import config as cfg
from app.engine.model import LlamaModel
from app.engine.settings import EngineSettings
settings = cfg.build({"n_ctx": 256, "n_batch": 256, "n_cpu_moe": 3}).engine_settings(sys.argv[1], "probe")
LlamaModel(settings).close()
print("LOADED")
"""


def test_n_cpu_moe_reaches_llama_cpp_and_the_demo_model_still_loads(demo_model: str) -> None:
    plain = load(demo_model, n_ctx=256, n_cpu_moe=9999)  # no expert tensors: nothing matches, it loads
    plain.close()
    out = subprocess.run([sys.executable, "-c", N_CPU_MOE_PROBE, demo_model], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert "LOADED" in out.stdout, out.stderr[-2000:]
    overridden = {line.split()[1] for line in out.stderr.splitlines() if "buffer type overridden to CPU" in line}
    assert overridden == {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight", "blk.2.ffn_down.weight"}
