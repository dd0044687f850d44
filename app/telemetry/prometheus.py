"""Prometheus metrics with prometheus_client: request counters and histograms, live gauges.

Counters and histograms are updated once per request (from RequestStats).
Gauges for the engine (in flight, queue, slots, idle) and the machine are
read at scrape time from the same objects the reporter reads, so nothing is
sampled twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from app.runtime import Runtime

PREFIX = "llamacpp"
KNOWN_ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/tokenize",
                   "/detokenize", "/metrics"}
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def endpoint_label(path: str) -> str:
    """Bounded label values: a scan of random paths must not grow the metric set."""
    if path in KNOWN_ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return "other"


class RequestMetrics:
    """The per-request Prometheus instruments, in a registry of their own (no process globals)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests served, by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram(f"{PREFIX}_request_latency_seconds", "End-to-end request latency (streams: to the "
                                 "last byte)", ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Time from request to the first generated "
                              "token", buckets=TTFT_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.completion_tokens = Counter(f"{PREFIX}_completion_tokens", "Tokens generated", registry=self.registry)

    def observe(self, path: str, status: int, latency_s: float, ttft_s: Optional[float], prompt_tokens: int,
                completion_tokens: int) -> None:
        endpoint = endpoint_label(path)
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(latency_s)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)
        if completion_tokens:
            self.completion_tokens.inc(completion_tokens)


class LiveCollector(Collector):
    """Gauges read at scrape time from the runtime and the hardware sampler."""

    def __init__(self, runtime: "Runtime") -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        rt = self.runtime
        yield _gauge("in_flight_requests", "Requests being served now", rt.stats.in_flight)
        yield _gauge("idle_seconds", "Seconds since the last request ended (0 while one is in flight)",
                     rt.stats.idle_seconds())
        yield _gauge("ready", "1 when the model is loaded and serving", 1.0 if rt.ready else 0.0)
        engine = rt.engine
        if engine is not None:
            yield _gauge("queue_depth", "Requests waiting for a free sequence", engine.queue_depth)
            yield _gauge("slots_processing", "Sequences decoding now", engine.active)
            yield _gauge("slots_total", "Sequences decoded together (--parallel)", engine.parallel)
        hw = rt.hardware.latest()
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


def render(registry: CollectorRegistry) -> bytes:
    return bytes(generate_latest(registry))
