"""Prometheus metrics with prometheus_client: request counters and histograms, live gauges.

Counters and histograms are updated once per request (from RequestStats).
The gauges (gauges.py) are read at scrape time from the same objects the
reporter reads, so nothing is sampled twice.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

PREFIX = "llamacpp"
KNOWN_ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/responses",
                   "/v1/messages", "/v1/messages/count_tokens", "/chat/completions", "/completions", "/embeddings",
                   "/models", "/tokenize", "/detokenize", "/metrics"}
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

    def observe(self, endpoint: str, status: int, latency_s: float, ttft_s: float | None, prompt_tokens: int,
                completion_tokens: int) -> None:
        """One finished request; `endpoint` is already a label from `endpoint_label` (RequestStats makes it)."""
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(latency_s)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)
        if completion_tokens:
            self.completion_tokens.inc(completion_tokens)


def render(registry: CollectorRegistry) -> bytes:
    return bytes(generate_latest(registry))
