"""Prometheus metrics of both tiers.

The API serves them at /metrics; each worker (jobs run in the worker process itself) on WORKER_METRICS_PORT.
With several API processes (`serve --workers N`), prometheus_client's multiprocess mode adds them up: the parent
sets PROMETHEUS_MULTIPROC_DIR (a fresh directory per start) before any process imports prometheus_client, every
process writes its values there, and whichever process answers /metrics reads them all (`exposition`). Each
gauge says how its values combine: summed over the live processes, or the most recent value written.
"""

from __future__ import annotations

import os

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REQUESTS = Counter("dhp_http_requests_total", "HTTP requests answered", ["route", "method", "status"])
BYTES_SERVED = Counter("dhp_http_response_bytes_total", "Archive bytes sent to clients", ["route"])
CACHE = Counter("dhp_cache_requests_total", "Downloads by whether the image was already prepared", ["result"])
PREPARE_SECONDS = Histogram("dhp_prepare_duration_seconds", "Time to prepare one image (download, verify, unpack)",
                            buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600))
UPSTREAM = Counter("dhp_upstream_requests_total", "Requests to registries", ["operation", "status"])
UPSTREAM_BYTES = Counter("dhp_upstream_bytes_total",
                         "Blob bytes received from registries (configs and layers, resumed or repeated bytes too)")
EVICTIONS = Counter("dhp_store_evictions_total", "Layers evicted to stay under CACHE_MAX_BYTES")
JOBS_IN_FLIGHT = Gauge("dhp_jobs_in_flight", "Preparations running in this process (API: in all its processes)",
                       multiprocess_mode="livesum")
STORE_BYTES = Gauge("dhp_store_layer_bytes", "Bytes of unpacked layers in the store", multiprocess_mode="mostrecent")
QUEUE_DEPTH = Gauge("dhp_queue_depth", "Preparation jobs waiting in the RQ queue", multiprocess_mode="mostrecent")
WAITING_REQUESTS = Gauge("dhp_requests_waiting_for_preparation", "Requests waiting for a preparation",
                         multiprocess_mode="livesum")
RATELIMIT_LIMIT = Gauge("dhp_registry_ratelimit_limit",
                        "Pulls a registry allows per window, as its last ratelimit-limit header said", ["registry"],
                        multiprocess_mode="mostrecent")
RATELIMIT_REMAINING = Gauge("dhp_registry_ratelimit_remaining",
                            "Pulls left in the window, as the registry's last ratelimit-remaining header said",
                            ["registry"], multiprocess_mode="mostrecent")

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"


def exposition() -> bytes:
    """The text format of every metric: this process's, or with several processes, all of theirs added up."""
    if not os.environ.get(MULTIPROCESS_DIR):
        return generate_latest(REGISTRY)
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return generate_latest(registry)
