"""Load and leak test on loopback: the real app, many clients, a mix of every kind of request.

    python scripts/load_test.py --clients 8 --seconds 30      # load: served, errors, percentiles, tokens/s
    python scripts/load_test.py --leak-requests 1000           # RSS after the first 100 vs after all

Bounded in count and time, and only ever talks to 127.0.0.1. Prints Markdown, writes JSON to bench-results/.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
API_KEY = "load-key"
log = logging.getLogger("load")


class App:
    def __init__(self, port: int, parallel: int, max_queue: int) -> None:
        self.port = port
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app", "--offline", "--model", "demo", "--port", str(port), "--api-key", API_KEY,
             "--embeddings", "--parallel", str(parallel), "--max-queue", str(max_queue),
             "--n-ctx", str(parallel * 1024),
             "--idle-time-limit-hours", "0", "--log-level", "WARNING"],
            cwd=REPO, env={**os.environ, "CLEARML_CACHE_DIR": str(REPO / ".cache" / "load-clearml")},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("the app exited during start-up")
            time.sleep(0.1)
        raise RuntimeError("the app did not become ready")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_mb(self) -> float:
        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def stop(self) -> str:
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err.decode(errors="replace")


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.status: collections.Counter[str] = collections.Counter()
        self.latency: list[float] = []
        self.ttft: list[float] = []
        self.tokens = 0
        self.truncated = 0
        self.rejected_without_retry_after = 0
        self.kinds: collections.Counter[str] = collections.Counter()

    def add(self, kind: str, status: int, latency: float, ttft: float | None = None, tokens: int = 0,
            truncated: bool = False, retry_after: bool = True) -> None:
        with self.lock:
            self.kinds[kind] += 1
            self.status[str(status)] += 1
            if status == 200:
                self.latency.append(latency)
                if ttft is not None:
                    self.ttft.append(ttft)
                self.tokens += tokens
            self.truncated += int(truncated)
            if status == 429 and not retry_after:
                self.rejected_without_retry_after += 1


def one_request(client: httpx.Client, kind: str, rng: random.Random, tally: Tally) -> int:
    """One request of the given kind, tallied; returns its HTTP status."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    started = time.perf_counter()
    n = rng.randint(8, 48)
    if kind == "embeddings":
        r = client.post("/v1/embeddings", json={"input": [f"text {rng.random()}", "another"]}, headers=headers)
        tally.add(kind, r.status_code, time.perf_counter() - started, retry_after="retry-after" in r.headers)
        return r.status_code
    if kind in ("chat", "completion"):
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        body: dict[str, Any] = {"max_tokens": n, "temperature": 0.7, "seed": rng.randint(0, 1000)}
        body.update({"messages": [{"role": "user", "content": f"Tell me about item {rng.randint(0, 99)}"}]}
                    if kind == "chat" else {"prompt": f"Item {rng.randint(0, 99)} is"})
        r = client.post(path, json=body, headers=headers)
        tokens = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
        tally.add(kind, r.status_code, time.perf_counter() - started, tokens=tokens,
                  retry_after="retry-after" in r.headers)
        return r.status_code
    # streaming chat or completion
    chat = kind == "chat-stream"
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"max_tokens": n, "temperature": 0, "stream": True, "ignore_eos": True,
            **({"messages": [{"role": "user", "content": "Count to ten."}]} if chat else {"prompt": "Once"})}
    ttft = None
    tokens = 0
    done = False
    finish = None
    with client.stream("POST", path, json=body, headers=headers) as r:
        if r.status_code != 200:
            r.read()
            tally.add(kind, r.status_code, time.perf_counter() - started, retry_after="retry-after" in r.headers)
            return r.status_code
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or []
                if choices:
                    piece = choices[0].get("delta", {}).get("content") if chat else choices[0].get("text")
                    if piece:
                        tokens += 1
                        ttft = ttft if ttft is not None else time.perf_counter() - started
                    finish = choices[0].get("finish_reason") or finish
    # ignore_eos with a completion: every stream must run to max_tokens; a chat may end on its template's stop
    truncated = not done or finish is None or (not chat and finish != "length")
    tally.add(kind, 200, time.perf_counter() - started, ttft, tokens, truncated)
    return 200


KINDS = ["chat", "completion", "chat-stream", "completion-stream", "embeddings"]


def load(app: App, clients: int, seconds: float) -> dict[str, Any]:
    tally = Tally()
    stop_at = time.monotonic() + seconds

    def worker(i: int) -> None:
        rng = random.Random(i)
        with httpx.Client(base_url=app.url, timeout=120) as client:
            while time.monotonic() < stop_at:
                try:
                    if one_request(client, rng.choice(KINDS), rng, tally) == 429:
                        time.sleep(1.0)  # honour Retry-After, as the OpenAI client does
                except httpx.HTTPError as exc:
                    tally.add("transport", 599, 0.0, truncated=True)
                    log.warning("transport error: %s", exc)

    began = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1)))] * 1000 if ordered else 0.0

    return {
        "clients": clients, "seconds": round(wall, 1), "requests": sum(tally.status.values()),
        "by_status": dict(tally.status), "by_kind": dict(tally.kinds),
        "server_errors_5xx": sum(v for k, v in tally.status.items() if k.startswith("5")),
        "truncated_streams": tally.truncated, "429_without_retry_after": tally.rejected_without_retry_after,
        "latency_ms": {"p50": pct(tally.latency, 0.5), "p95": pct(tally.latency, 0.95),
                       "p99": pct(tally.latency, 0.99)},
        "ttft_ms": {"p50": pct(tally.ttft, 0.5), "p95": pct(tally.ttft, 0.95), "p99": pct(tally.ttft, 0.99)},
        "tokens_per_s": tally.tokens / wall,
    }


def leak(app: App, total: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    rss: dict[int, float] = {}
    sent = 0
    lock = threading.Lock()

    def worker(i: int) -> None:
        nonlocal sent
        rng = random.Random(1000 + i)
        with httpx.Client(base_url=app.url, timeout=120) as client:
            while True:
                with lock:
                    if sent >= total:
                        return
                    sent += 1
                    k = sent
                kind = ["chat", "completion", "embeddings"][k % 3]
                if kind == "embeddings":
                    client.post("/v1/embeddings", json={"input": f"leak check {k}"}, headers=headers)
                else:
                    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
                    body: dict[str, Any] = {"max_tokens": 4, "seed": k}
                    body.update({"messages": [{"role": "user", "content": f"n {k}"}]} if kind == "chat"
                                else {"prompt": f"n {k} {rng.random()}"})
                    client.post(path, json=body, headers=headers)
                if k in (100, total):
                    rss[k] = app.rss_mb()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"requests": total, "rss_after_100_mb": rss.get(100), f"rss_after_{total}_mb": rss.get(total),
            "growth": (rss[total] / rss[100] - 1) if 100 in rss and total in rss else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--max-queue", type=int, default=2, help="small, so the run also shows 429s")
    parser.add_argument("--leak-requests", type=int, default=0, help="run the leak check with this many requests")
    parser.add_argument("--port", type=int, default=18995)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args.seconds = min(args.seconds, 600)  # bounded, whatever is asked
    app = App(args.port, args.parallel, args.max_queue)
    result: dict[str, Any] = {"date": datetime.date.today().isoformat()}
    try:
        if args.leak_requests:
            result["leak"] = leak(app, min(args.leak_requests, 20_000))
        else:
            result["load"] = load(app, args.clients, args.seconds)
            result["load"]["max_queue"] = args.max_queue
            result["load"]["parallel"] = args.parallel
    finally:
        stderr = app.stop()
    result["server_tracebacks"] = stderr.count("Traceback")
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    out = REPO / "bench-results" / f"load-{result['date']}-{'leak' if args.leak_requests else 'load'}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
