"""make bench (KV part): what the KV cache type costs and buys, measured side by side in one run.

For each cache type (f16, q8_0, q4_0 for both K and V, flash attention on) the app's engine is loaded in a
fresh process at two context sizes. Measured, not computed:
  KV MiB            the KV buffers llama.cpp allocated for the larger context (its own allocation report)
  RSS per 1k tokens the process's resident growth per 1,000 tokens of context (difference of the two loads)
  decode tok/s      one greedy stream after a 1,000-token prompt, median of the runs
and from those: the largest context whose KV cache fits a fixed budget (--budget-mib), and each type's ratio to
f16. Prints a Markdown table and writes the same as JSON (bench-results/).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("bench_kv")

TYPES = ("f16", "q8_0", "q4_0")
KV_REPORT = re.compile(r"llama_kv_cache: size =\s*([\d.]+) MiB")


def worker(model: str, kv: str, n_ctx: int, runs: int, tokens: int) -> dict[str, Any]:
    """One load of the engine with this cache type and context; decode speed when `runs` > 0."""
    sys.path.insert(0, str(REPO))
    from app.config import AppConfig
    from app.engine.engine import LlamaEngine
    from app.engine.types import Delta, Finish, GenerationRequest, SamplingParams

    before = psutil.Process().memory_info().rss
    config = AppConfig(n_ctx=n_ctx, n_batch=512, parallel=1, max_queue=1, cache_type_k=kv, cache_type_v=kv,
                       flash_attn="on")
    engine = LlamaEngine(config.engine_settings(model, "bench", verbose=True))
    loaded = psutil.Process().memory_info().rss
    out: dict[str, Any] = {"rss_growth_mib": (loaded - before) / 2**20}
    if runs:
        prompt = engine.tokenize("The history of the city is long. " * 125)[:1000]

        async def one() -> float:
            handle = engine.submit(GenerationRequest(prompt, tokens, SamplingParams(temperature=0),
                                                     ignore_eos=True), asyncio.get_running_loop())
            first = last = None
            n = 0
            while True:
                event = await handle.next_event()
                if isinstance(event, Delta) and event.token_ids:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    n += len(event.token_ids)
                elif isinstance(event, Finish):
                    break
            assert first is not None and last is not None
            return (n - 1) / (last - first)

        out["decode_tps"] = statistics.median(asyncio.run(one()) for _ in range(runs))
    engine.close()
    return out


def run_worker(model: str, kv: str, n_ctx: int, runs: int, tokens: int) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--worker", "--model", model, "--type", kv, "--n-ctx",
                           str(n_ctx), "--runs", str(runs), "--tokens", str(tokens)], cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kv} n_ctx {n_ctx} failed: {proc.stderr[-800:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    sizes = [float(m) for m in KV_REPORT.findall(proc.stderr)]
    result["kv_mib"] = sum(sizes) if sizes else None  # llama.cpp reports the full and the SWA cache apart
    return result


def table(rows: dict[str, dict[str, Any]], n_ctx: int, budget_mib: int) -> str:
    base = rows["f16"]
    lines = [f"| KV type (K and V) | KV MiB at {n_ctx} tokens | vs f16 | RSS MiB per 1k tokens | decode tok/s | "
             f"vs f16 | largest context in {budget_mib} MiB of KV |", "|---|---|---|---|---|---|---|"]
    for kv, r in rows.items():
        lines.append(f"| {kv} | {r['kv_mib']:.0f} | {r['kv_mib'] / base['kv_mib']:.2f} | "
                     f"{r['rss_per_1k_mib']:.1f} | {r['decode_tps']:.1f} | {r['decode_tps'] / base['decode_tps']:.2f} "
                     f"| {r['largest_ctx']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF path (default: the bundled demo model)")
    parser.add_argument("--n-ctx", type=int, default=32768, help="the context measured")
    parser.add_argument("--small-ctx", type=int, default=4096, help="the second load, for the RSS slope")
    parser.add_argument("--budget-mib", type=int, default=1024, help="KV memory budget for the largest context")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", default=str(REPO / "bench-results"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--type", default="f16", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.model is None:
        sys.path.insert(0, str(REPO))
        from app.model_source import demo_model_path

        args.model = demo_model_path()
    if args.worker:
        sys.stdout.write(json.dumps(worker(args.model, args.type, args.n_ctx, args.runs, args.tokens)) + "\n")
        return 0
    rows: dict[str, dict[str, Any]] = {}
    for kv in TYPES:
        log.info("KV %s ...", kv)
        big = run_worker(args.model, kv, args.n_ctx, args.runs, args.tokens)
        small = run_worker(args.model, kv, args.small_ctx, 0, args.tokens)
        per_token_mib = big["kv_mib"] / args.n_ctx
        rows[kv] = {**big, "rss_per_1k_mib": (big["rss_growth_mib"] - small["rss_growth_mib"]) * 1000
                    / (args.n_ctx - args.small_ctx),
                    "largest_ctx": int(args.budget_mib / per_token_mib) // 256 * 256}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    meta = {"date": datetime.date.today().isoformat(), "commit": commit, "model": Path(args.model).name,
            "n_ctx": args.n_ctx, "budget_mib": args.budget_mib, "runs": args.runs, "tokens": args.tokens}
    text = table(rows, args.n_ctx, args.budget_mib)
    sys.stdout.write(f"{meta['date']}, commit {commit}, {meta['model']}, decode of {args.tokens} tokens after a "
                     f"1,000-token prompt, median of {args.runs}\n\n{text}\n")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / f"bench-kv-{meta['date']}-{commit}.json"
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
