"""`docker-http-passthrough worker`: an RQ worker on the preparation queue."""

from __future__ import annotations

import logging
import os
import tempfile

from redis import Redis
from rq import Queue, Worker

from shared.settings import Settings
from shared.store import Store

log = logging.getLogger("docker_http_passthrough.worker")


def serve_metrics(port: int) -> None:
    """RQ runs each job in a forked process: metrics go through prometheus_client's multiprocess files, and this
    process serves their sum. Must run before anything imports shared.metrics."""
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="dhp-worker-metrics-"))
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    try:
        start_http_server(port, registry=registry)
        log.info("worker metrics on port %d (/metrics)", port)
    except OSError as exc:  # e.g. two workers on one host: the second one runs without its own endpoint
        log.warning("worker metrics port %d unavailable (%s); set WORKER_METRICS_PORT", port, exc)


def run(settings: Settings, *, burst: bool = False, name: str | None = None) -> None:
    if not settings.redis_url:
        raise SystemExit("the worker needs REDIS_URL: it takes preparation jobs from Redis")
    if settings.worker_metrics_port:
        serve_metrics(settings.worker_metrics_port)
    swept = Store(settings.cache_dir).sweep_partials()
    if swept:
        log.info("removed %d partial files left by crashed writers", swept)
    connection = Redis.from_url(settings.redis_url)
    queue = Queue(settings.queue_name, connection=connection)
    worker = Worker([queue], connection=connection, name=name)
    worker.work(burst=burst, with_scheduler=False)
