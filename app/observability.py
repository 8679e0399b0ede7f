"""Prometheus metrics and the access log, in one place.

Each app gets its own registry, so several apps in one process (tests) never share counts.
Labels hold route templates, never raw paths: a scan of random URLs cannot grow the series.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

access_log = logging.getLogger("seglock.access")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """The server's log lines at `level`, in one format: `seglock serve` sets it in its process, and
    every `--workers N` process (spawned, so starting with Python's defaults) again in its own."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "seglock_requests_total", "HTTP requests by route and status",
            ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram(
            "seglock_request_duration_seconds", "HTTP request latency by route",
            ["method", "route"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram(
            "seglock_batch_size", "Images per forward pass", ["model"],
            buckets=_BATCH_BUCKETS, registry=self.registry)
        self.inference = Histogram(
            "seglock_inference_seconds", "Forward-pass time per batch", ["model"],
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge(
            "seglock_queue_depth", "Requests waiting per model", ["model"], registry=self.registry)
        self.key_rotations = Counter(
            "seglock_key_rotations_total", "Key rotations by model and outcome",
            ["model", "outcome"], registry=self.registry)

    def observe_batch(self, model: str, size: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(size)
        self.inference.labels(model).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
