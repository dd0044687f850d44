"""The benchmark's report: skipped peers are shown as skipped (never as zero), ratios come from the same run."""

from __future__ import annotations

from scripts.bench import table


def test_unbuilt_peers_are_skipped_not_zero() -> None:
    results = {"kernel ceiling": None, "direct": {"decode_tps_1": 70.0}, "app": {"decode_tps_1": 77.0},
               "llama-server": None, "llama-cpp-python": None}
    text = table(results)
    row = next(line for line in text.splitlines() if line.startswith("| single-stream decode"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "skipped" and cells[4] == "skipped" and cells[5] == "skipped"
    assert cells[2] == "70.0" and cells[3] == "77.0"
    assert cells[6] == "1.10" and cells[7] == "–"  # app / direct; no llama-server figure to divide by


def test_cut_streams_are_reported() -> None:
    results = {"kernel ceiling": None, "direct": None, "app": None, "llama-server": None,
               "llama-cpp-python": {"aggregate_tps_4": 54.1, "aggregate_broken_4": 3}}
    assert "54.1 (3 of 4 streams cut short)" in table(results)
