"""Single-stream decode tokens/s: direct llama_cpp.Llama vs this app over HTTP, side by side in one run.

A first step toward `make bench` (issue 6): same model, same prompt, temperature 0, fixed length.
Prints a Markdown table with the ratio app / direct.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Optional

import httpx

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("bench")
PROMPT = "Once upon a time"


def decode_rate(tokens: Iterable[object]) -> float:
    """Tokens per second after the first one arrives (so prompt time is not counted)."""
    first: Optional[float] = None
    count = 0
    for _ in tokens:
        count += 1
        if first is None:
            first = time.perf_counter()
    if first is None or count < 2:
        raise RuntimeError("the stream produced fewer than two tokens")
    return (count - 1) / (time.perf_counter() - first)


def direct(model: str, n: int, runs: int) -> float:
    from llama_cpp import Llama

    from app.engine.model import default_threads

    # Same threads as the app (Llama defaults to half the cores).
    llm = Llama(model_path=model, n_ctx=2048, n_batch=512, n_threads=default_threads(), verbose=False)
    rates = []
    for _ in range(runs):
        llm.reset()
        rates.append(decode_rate(llm.create_completion(PROMPT, max_tokens=n, temperature=0, stream=True)))
    return statistics.median(rates)


def over_http(model: str, n: int, runs: int) -> float:
    proc = subprocess.Popen([sys.executable, "-m", "app", "--offline", "--model", model, "--port", "18999",
                             "--api-key", "bench", "--idle-time-limit-hours", "0"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get("http://127.0.0.1:18999/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        rates = []
        body = {"prompt": PROMPT, "max_tokens": n, "temperature": 0, "stream": True, "ignore_eos": True}
        for _ in range(runs):
            with httpx.stream("POST", "http://127.0.0.1:18999/v1/completions", json=body, timeout=300,
                              headers={"X-Api-Key": "bench"}) as r:
                tokens = (line for line in r.iter_lines() if line.startswith("data: {") and '"text":""' not in line)
                rates.append(decode_rate(tokens))
        return statistics.median(rates)
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    from app.model_source import demo_model_path

    model = demo_model_path()
    d = direct(model, args.tokens, args.runs)
    h = over_http(model, args.tokens, args.runs)
    sys.stdout.write("| path | decode tok/s (median) | ratio to direct |\n|---|---|---|\n")
    sys.stdout.write(f"| direct llama_cpp.Llama | {d:.1f} | 1.00 |\n")
    sys.stdout.write(f"| this app over HTTP | {h:.1f} | {h / d:.2f} |\n")


if __name__ == "__main__":
    main()
