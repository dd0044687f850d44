"""Reporter overhead: CPU time of one report (stats, hardware sample, ClearML offline scalars), as a share of one
core at a 1-second interval. Target (issue 4): under 1%.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("CLEARML_CACHE_DIR", tempfile.mkdtemp(prefix="bench-reporter-"))
    from app.clearml.session import AppTask
    from app.lifecycle import Lifecycle
    from app.telemetry.hardware import HardwareSampler
    from app.telemetry.history import History
    from app.telemetry.reporter import Reporter
    from app.telemetry.stats import RequestStats

    task = AppTask.start(offline=True, project="bench", name="reporter overhead")
    lifecycle, stats, hardware = Lifecycle(), RequestStats(), HardwareSampler()
    reporter = Reporter(stats, hardware, History(), lifecycle, lifecycle.note_activity, task, interval_s=1.0)
    hardware.max_age_s = 0  # a fresh hardware sample every report, as at a 1 s interval
    reports = 60
    # Process CPU time over the whole run counts ClearML's own writer thread and the request bookkeeping
    # too, so the figure is an upper bound for the reporter alone.
    t0 = time.process_time()
    for _ in range(reports):
        for _ in range(20):  # a busy second's worth of requests
            started = stats.begin()
            stats.end("/v1/completions", 200, started, 0.01, 10, 20)
        reporter.report()
    task.task.flush(wait_for_uploads=True)
    spent = time.process_time() - t0
    task.close()
    per_report_ms = spent / reports * 1000
    sys.stdout.write("| measure | value |\n|---|---|\n")
    sys.stdout.write(f"| CPU per report (upper bound: mean of {reports}, incl. ClearML's writer) "
                     f"| {per_report_ms:.2f} ms |\n")
    sys.stdout.write(f"| share of one core at a 1 s interval | {per_report_ms / 10:.2f} % |\n")


if __name__ == "__main__":
    main()
