"""make bench (RPC rows): the price of llama.cpp's RPC hop, measured side by side in one run.

The app serves the demo model three ways on this machine: in one process (no worker), with every layer on one
local RPC worker, and split across two local workers (`python -m app.rpc_worker` on 127.0.0.1). Each row gives
single-stream decode tok/s, aggregate decode tok/s at 4 streams and TTFT of a short prompt, with its ratio to the
no-worker row. Repacking is off in the no-worker row, as it is on the workers (same kernels, same tokens), and a
row with repacking on shows what the default single process gets.

On one machine the workers share its cores with the leader: this measures the hop's cost (serialisation,
loopback sockets, one round trip per device per step), not a gain. Across machines the gain is memory: a model
bigger than one machine's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench import API_KEY, REPO, SHORT_PROMPT, HTTPClient, Target, aggregate  # noqa: E402

log = logging.getLogger("bench_rpc")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_worker(port: int, threads: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "app.rpc_worker", "--host", "127.0.0.1", "--port", str(port),
                             "--threads", str(threads)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    import socket

    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"RPC worker on port {port} did not start")


def measure(model: str, workers: list[str], repack: bool, threads: int, runs: int, tokens: int) -> dict[str, Any]:
    port = free_port()
    args = [sys.executable, "-m", "app", "--offline", "--model", model, "--port", str(port), "--api-key", API_KEY,
            "--parallel", "4", "--n-ctx", "4096", "--n-threads", str(threads), "--idle-time-limit-hours", "0",
            "--log-level", "WARNING", "--repack-weights" if repack else "--no-repack-weights"]
    if workers:
        args += ["--rpc-servers", ",".join(workers)]
    target = Target("app", args, "/health", env={"CLEARML_CACHE_DIR": str(REPO / ".cache" / "bench-clearml")})
    try:
        cold = target.start(port)
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
        client = HTTPClient(port, {})
        try:
            client.stream(SHORT_PROMPT, 8)
            single = [client.stream(f"{SHORT_PROMPT} ({i})", tokens) for i in range(runs)]
            short = [client.stream(f"{SHORT_PROMPT} number {i}", 4).ttft_s for i in range(max(runs, 5))]
            agg, broken = aggregate(client, 4, tokens)
        finally:
            client.close()
    finally:
        target.stop()
    return {"decode_tps_1": statistics.median(r.decode_rate for r in single), "aggregate_tps_4": agg,
            "aggregate_broken_4": broken, "ttft_short_p50_ms": statistics.median(short) * 1000, "cold_start_s": cold,
            "devices": health.get("devices", [])}


def table(rows: dict[str, dict[str, Any]]) -> str:
    base = rows.get("no worker (repacking off)") or {}
    head = ("| layers | decode tok/s, 1 stream | aggregate tok/s, 4 streams | TTFT short p50 ms | cold start s "
            "| decode vs no worker |")
    lines = [head, "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        ratio = r["decode_tps_1"] / base["decode_tps_1"] if base.get("decode_tps_1") else float("nan")
        lines.append(f"| {name} | {r['decode_tps_1']:.1f} | {r['aggregate_tps_4']:.1f} | "
                     f"{r['ttft_short_p50_ms']:.1f} | {r['cold_start_s']:.2f} | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF path (default: the bundled demo model)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="0 = all cores (the leader's and each worker's)")
    parser.add_argument("--out", default=str(REPO / "bench-results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    import llama_cpp

    if not llama_cpp.llama_supports_rpc():
        log.info("skipped: this llama-cpp-python build has no RPC backend (make install builds one)")
        return 0
    if args.model is None:
        from app.model_source import demo_model_path

        args.model = demo_model_path()
    threads = args.threads or os.cpu_count() or 1
    ports = [free_port(), free_port()]
    workers = [start_worker(p, threads) for p in ports]
    endpoints = [f"127.0.0.1:{p}" for p in ports]
    rows: dict[str, dict[str, Any]] = {}
    try:
        for name, servers, repack in (("no worker (repacking on, the default)", [], True),
                                      ("no worker (repacking off)", [], False),
                                      ("1 local RPC worker", endpoints[:1], False),
                                      ("2 local RPC workers", endpoints, False)):
            log.info("%s ...", name)
            rows[name] = measure(args.model, servers, repack, threads, args.runs, args.tokens)
    finally:
        for w in workers:
            w.terminate()
            w.wait(15)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    sys.stdout.write(f"{time.strftime('%Y-%m-%d')}, commit {commit}, {os.cpu_count()} cores, "
                     f"{Path(args.model).name}, {args.tokens}-token completions, median of {args.runs}; workers on "
                     "127.0.0.1, sharing this machine's cores\n\n" + table(rows) + "\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench-rpc-{time.strftime('%Y-%m-%d')}-{commit}.json"
    path.write_text(json.dumps({"rows": rows, "tokens": args.tokens, "runs": args.runs}, indent=2) + "\n")
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
