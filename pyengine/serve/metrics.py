"""Prometheus metrics of one server, and the ASGI middleware that counts every request.

Each application gets its own registry (tests and benchmarks start several servers in one
process). Exposed at GET /metrics in the Prometheus text format:

- pyengine_serve_requests_total{endpoint,status} and pyengine_serve_errors_total{endpoint,status}
  (status >= 400), counted by the middleware so that refusals made before a handler runs
  (413, 422) count too;
- pyengine_serve_request_latency_seconds{endpoint}: from the request's arrival to the last byte
  of its answer (the whole stream, for a streamed generation);
- pyengine_serve_requests_in_progress, pyengine_serve_queue_depth (sequences and jobs waiting for
  the model), pyengine_serve_active_sequences (in the decoding batch);
- pyengine_serve_generated_tokens_total, pyengine_serve_tokens_per_second (over the last 10 s),
  pyengine_serve_batch_rows (sequences advanced per model step: how much batching happens).
"""

from __future__ import annotations

import collections
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

ENDPOINTS = ("/generate", "/classify", "/health", "/metrics")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
TOKEN_RATE_WINDOW = 10.0  # seconds


class ServeMetrics:
    """The metrics of one application, in a registry of its own."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pyengine_serve_requests", "HTTP requests answered",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("pyengine_serve_errors", "HTTP requests answered with status >= 400",
                              ["endpoint", "status"], registry=r)
        self.latency = Histogram("pyengine_serve_request_latency_seconds",
                                 "Seconds from a request's arrival to the end of its answer",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_progress = Gauge("pyengine_serve_requests_in_progress",
                                 "HTTP requests being answered", registry=r)
        self.queue_depth = Gauge("pyengine_serve_queue_depth",
                                 "Sequences and jobs waiting for the model", registry=r)
        self.active = Gauge("pyengine_serve_active_sequences",
                            "Sequences in the decoding batch", registry=r)
        self.tokens = Counter("pyengine_serve_generated_tokens", "Tokens generated", registry=r)
        self.batch_rows = Histogram("pyengine_serve_batch_rows",
                                    "Sequences advanced by one model step",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.tokens_per_second = Gauge(
            "pyengine_serve_tokens_per_second",
            f"Tokens generated per second over the last {TOKEN_RATE_WINDOW:g} s", registry=r)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self.tokens_per_second.set_function(self._token_rate)

    def observe_step(self, rows: int, new_tokens: int) -> None:
        """One model step advanced `rows` sequences and produced `new_tokens` tokens."""
        if rows:
            self.batch_rows.observe(rows)
        self.count_tokens(new_tokens)

    def count_tokens(self, new_tokens: int) -> None:
        if new_tokens:
            self.tokens.inc(new_tokens)
            self._recent.append((time.monotonic(), new_tokens))
            self._forget_before(time.monotonic() - TOKEN_RATE_WINDOW)

    def _forget_before(self, moment: float) -> None:
        while self._recent and self._recent[0][0] < moment:
            self._recent.popleft()

    def _token_rate(self) -> float:
        self._forget_before(time.monotonic() - TOKEN_RATE_WINDOW)
        return sum(n for _, n in self._recent) / TOKEN_RATE_WINDOW

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware: counts each HTTP request by endpoint and status and times it to the
    last byte of the answer (so a stream is timed whole). Paths outside ENDPOINTS are counted
    as "other", keeping the label set small whatever clients ask for."""

    def __init__(self, app, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        start = time.perf_counter()
        status = 500
        finished = False

        async def timed_send(message) -> None:
            nonlocal status, finished
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                finished = True

        self.metrics.in_progress.inc()
        try:
            await self.app(scope, receive, timed_send)
        finally:
            self.metrics.in_progress.dec()
            # An exception here is answered 500 by the server; a client gone mid-stream is
            # counted with the status it had been sent, its latency not observed.
            self.metrics.requests.labels(endpoint, str(status)).inc()
            if status >= 400:
                self.metrics.errors.labels(endpoint, str(status)).inc()
            if finished:
                self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
