"""Prometheus gauges read at scrape time: in flight, idle, readiness, the engine's load and the machine.

They read the same objects the reporter reads (request stats, the hardware sampler, the app's state through
`ServingView`), so nothing is sampled twice.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.telemetry.hardware import HardwareSampler
from app.telemetry.prometheus import PREFIX
from app.telemetry.stats import RequestStats
from app.telemetry.views import ServingView


class LiveCollector(Collector):
    """Gauges read at scrape time from the request stats, the app's state and the hardware sampler."""

    def __init__(self, stats: RequestStats, hardware: HardwareSampler, view: ServingView) -> None:
        self.stats = stats
        self.hardware = hardware
        self.view = view

    def collect(self) -> Iterator[Metric]:
        yield _gauge("in_flight_requests", "Requests being served now", self.stats.in_flight)
        yield _gauge("idle_seconds", "Seconds since the last request ended (0 while one is in flight)",
                     self.stats.idle_seconds())
        yield _gauge("ready", "1 when the model is loaded and serving", 1.0 if self.view.serving else 0.0)
        engine = self.view.engine
        if engine is not None:
            yield _gauge("queue_depth", "Requests waiting for a free sequence", engine.queue_depth)
            yield _gauge("slots_processing", "Sequences decoding now", engine.active)
            yield _gauge("slots_total", "Sequences decoded together (--parallel)", engine.parallel)
            yield _gauge("kv_cells_used", "KV cache cells in use (a shared prefix counted once)",
                         engine.kv_cells_used)
            yield _gauge("kv_cells_total", "KV cache cells (the context size)", engine.n_ctx)
            preempted = CounterMetricFamily(f"{PREFIX}_preemptions", "Sequences preempted because the KV cache "
                                            "was full (recomputed when room returned)", value=engine.preemptions)
            yield preempted
        hw = self.hardware.latest()
        yield _gauge("cpu_system_percent", "System CPU utilisation", hw.cpu_system_pct)
        yield _gauge("cpu_process_percent", "This process's CPU utilisation (100 = one core)", hw.cpu_process_pct)
        yield _gauge("memory_process_bytes", "Resident memory of this process", hw.memory_process_gb * 1024**3)
        yield _gauge("memory_used_bytes", "System memory in use", hw.memory_used_gb * 1024**3)
        yield _gauge("memory_total_bytes", "System memory", hw.memory_total_gb * 1024**3)
        yield _gauge("network_receive_mbps", "Network receive rate, MB/s", hw.net_rx_mbs)
        yield _gauge("network_transmit_mbps", "Network transmit rate, MB/s", hw.net_tx_mbs)
        yield _gauge("disk_read_mbps", "Disk read rate, MB/s", hw.disk_read_mbs)
        yield _gauge("disk_write_mbps", "Disk write rate, MB/s", hw.disk_write_mbs)
        if hw.gpus:
            util = GaugeMetricFamily(f"{PREFIX}_gpu_utilization_percent", "GPU utilisation", labels=["gpu"])
            used = GaugeMetricFamily(f"{PREFIX}_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
            total = GaugeMetricFamily(f"{PREFIX}_gpu_memory_total_bytes", "GPU memory", labels=["gpu"])
            temp = GaugeMetricFamily(f"{PREFIX}_gpu_temperature_celsius", "GPU temperature", labels=["gpu"])
            for gpu in hw.gpus:
                label = [str(gpu.index)]
                util.add_metric(label, gpu.utilization_pct)
                used.add_metric(label, gpu.memory_used_gb * 1024**3)
                total.add_metric(label, gpu.memory_total_gb * 1024**3)
                temp.add_metric(label, gpu.temperature_c)
            yield from (util, used, total, temp)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=float(value))
