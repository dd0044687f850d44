"""Hostile and careless clients: each finding of the hardening review, kept as a test (see docs/RELIABILITY.md)."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import API_KEY, AppProcess, ThreadedServer
from tests.fake_engine import FakeEngine

KEY = {"X-Api-Key": API_KEY}
JSON = {"Content-Type": "application/json"}


def post_raw(server: ThreadedServer, path: str, body: str, headers: dict[str, str] | None = None) -> httpx.Response:
    """Send JSON text exactly as written (a lone surrogate escape survives; httpx's json= would refuse it)."""
    return httpx.post(server.url + path, content=body.encode("ascii"), headers={**JSON, **(headers or KEY)})


# --- 6: lone surrogates are a 400 naming the field, never a 500 ------------------------------------------------

@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "hi \ud800"}]}', "messages"),
    ("/v1/completions", r'{"prompt": "\udfff", "max_tokens": 2}', "prompt"),
    ("/tokenize", r'{"content": "\ud800"}', "content"),
    ("/v1/completions", r'{"prompt": "x", "stop": ["\ud800"]}', "stop"),
    ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": '
     r'"json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "^\ud800$"}}}}',
     "response_format"),
])
def test_lone_surrogate_is_400_naming_the_field(fake_server: ThreadedServer, path: str, body: str,
                                                param: str) -> None:
    r = post_raw(fake_server, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "surrogate" in err["message"]
    assert httpx.get(fake_server.url + "/v1/models", headers=KEY).status_code == 200


# --- 12: numbers are strict, NaN is named as such -----------------------------------------------------------------

@pytest.mark.parametrize("body,param,words", [
    ('{"prompt": "x", "max_tokens": "5"}', "max_tokens", "integer"),
    ('{"prompt": "x", "max_tokens": true}', "max_tokens", "integer"),
    ('{"prompt": "x", "n": 1.5}', "n", "integer"),
    ('{"prompt": "x", "stream": "yes"}', "stream", "boolean"),
    ('{"prompt": "x", "temperature": NaN}', "temperature", "finite"),
    ('{"prompt": "x", "temperature": "0.5"}', "temperature", "number"),
])
def test_numbers_are_strict(fake_server: ThreadedServer, body: str, param: str, words: str) -> None:
    r = post_raw(fake_server, "/v1/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


def test_integral_temperature_is_still_a_number(fake_server: ThreadedServer) -> None:
    r = post_raw(fake_server, "/v1/completions", '{"prompt": "x", "temperature": 1, "max_tokens": 2}')
    assert r.status_code == 200, r.text


# --- 7: a request that can never be admitted is a 400 naming the limit, not a 429 to retry forever -------------

def test_more_choices_than_the_system_holds_is_400(fake_server: ThreadedServer, fake_engine: FakeEngine) -> None:
    many = fake_engine.capacity + 1
    r = httpx.post(fake_server.url + "/v1/completions", headers=KEY, json={"prompt": ["hi"] * many, "max_tokens": 1})
    assert r.status_code == 400 and "Retry-After" not in r.headers, r.text
    err = r.json()["error"]
    assert err["param"] == "prompt" and str(fake_engine.capacity) in err["message"]
    r = httpx.post(fake_server.url + "/v1/chat/completions", headers=KEY,
                   json={"messages": [{"role": "user", "content": "x"}], "n": many, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    assert fake_engine.requests == []  # nothing was queued
    ok = httpx.post(fake_server.url + "/v1/completions", headers=KEY,
                    json={"prompt": ["hi"] * fake_engine.capacity, "max_tokens": 1})
    assert ok.status_code == 200


# --- 11: the key is checked before the body is read -------------------------------------------------------------

def test_keyless_requests_get_401_whatever_the_body(fake_server: ThreadedServer) -> None:
    for content in (b"{not json", b"x" * (9 * 1024 * 1024), b'{"messages": "wrong"}'):
        r = httpx.post(fake_server.url + "/v1/chat/completions", content=content, headers=JSON)
        assert r.status_code == 401, (len(content), r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
    # unknown paths and wrong methods too: a scan learns nothing
    assert httpx.get(fake_server.url + "/wp-login.php").status_code == 401
    assert httpx.get(fake_server.url + "/v1/chat/completions").status_code == 401


# --- 12: HEAD /health, no Host-built redirects ----------------------------------------------------------------------

def test_head_health_and_no_trailing_slash_redirect(fake_server: ThreadedServer) -> None:
    assert httpx.head(fake_server.url + "/health").status_code == 200
    r = httpx.get(fake_server.url + "/v1/models/", headers={**KEY, "Host": "evil.example"}, follow_redirects=False)
    assert r.status_code == 404 and "location" not in r.headers
    r = httpx.post(fake_server.url + "/v1/completions/", headers={**KEY, "Host": "evil.example"},
                   json={"prompt": "x"}, follow_redirects=False)
    assert r.status_code == 404 and "location" not in r.headers


# --- 10: request paths never become metric labels -------------------------------------------------------------------

def test_random_paths_do_not_grow_the_metrics(fake_server: ThreadedServer) -> None:
    with httpx.Client(base_url=fake_server.url) as client:
        for i in range(300):
            client.get(f"/scan/{i}/" + "a" * 2000)
            client.get(f"/v1/x{i}", headers=KEY)
        text = client.get("/metrics", headers=KEY).text
    labels = {line.split("{", 1)[1].split("}", 1)[0] for line in text.splitlines()
              if line.startswith("llamacpp_requests_total{")}
    assert len(labels) <= 4, labels  # other/401, other/404, /metrics/200 ...
    assert all("scan" not in label for label in labels)
    assert len(fake_server.context.stats.snapshot().by_endpoint) <= 4


# --- 4: only authenticated use is activity --------------------------------------------------------------------------

def test_an_unauthenticated_scan_does_not_keep_the_app_alive(tmp_path: Path) -> None:
    app = AppProcess(["--offline", "--model", "demo", "--port", "0", "--api-key", API_KEY,
                      "--idle-time-limit-hours", "0.002"],  # 7.2 s
                     env={"CLEARML_CACHE_DIR": str(tmp_path)}).start()
    try:
        app.wait_ready()
        ready = time.time()
        assert app.proc is not None
        with httpx.Client(base_url=app.url, timeout=5) as client:
            while app.proc.poll() is None and time.time() - ready < 30:
                try:
                    client.get("/v1/chat/completions")  # 401 without the key
                    client.get("/wp-login.php")  # 401
                    client.get("/v1/chat/completions", headers=KEY)  # 405 with the key: not use
                    client.get("/wp-login.php", headers=KEY)  # 404 with the key: not use
                except httpx.HTTPError:
                    pass  # the app is on its way out
                time.sleep(1)
        assert app.wait_exit(30) == 0
        assert time.time() - ready < 7.2 + 6, app.log
        assert "idle for" in app.log
    finally:
        app.stop()


# --- 5: a stop never cuts a stream silently ---------------------------------------------------------------------

def test_drain_timeout_ends_streams_with_an_error_event_and_done(tmp_path: Path) -> None:
    app = AppProcess(["--offline", "--model", "demo", "--port", "0", "--api-key", API_KEY,
                      "--idle-time-limit-hours", "0", "--drain-timeout-sec", "1"],
                     env={"CLEARML_CACHE_DIR": str(tmp_path)}).start()
    try:
        app.wait_ready()
        events: list[str] = []
        blocking: dict[str, Any] = {}

        def stream() -> None:
            body = {"prompt": "Once", "max_tokens": 2000, "stream": True, "ignore_eos": True}
            with httpx.stream("POST", app.url + "/v1/completions", headers=KEY, json=body, timeout=60) as r:
                events.extend(line for line in r.iter_lines() if line)

        def whole() -> None:
            body = {"prompt": "Once", "max_tokens": 2000, "ignore_eos": True}
            r = httpx.post(app.url + "/v1/completions", headers=KEY, json=body, timeout=60)
            blocking["status"], blocking["body"] = r.status_code, r.json()

        workers = [threading.Thread(target=stream), threading.Thread(target=whole)]
        for w in workers:
            w.start()
        time.sleep(1.5)
        assert app.proc is not None
        app.proc.send_signal(signal.SIGTERM)
        for w in workers:
            w.join(30)
        assert app.wait_exit(30) == 0
        assert events[-1] == "data: [DONE]", events[-3:]
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["type"] == "service_unavailable" and "shutting down" in error["message"]
        assert blocking["status"] == 503 and blocking["body"]["error"]["type"] == "service_unavailable"
        assert "Traceback" not in app.log
        assert sum("stream ended by the server" in line for line in app.lines) == 1, app.log
    finally:
        app.stop()
