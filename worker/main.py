"""`docker-http-passthrough worker`: an RQ worker on the preparation queue."""

from __future__ import annotations

import logging

from prometheus_client import start_http_server

from docker_http_passthrough.shared.job_queue import PreparationQueue
from docker_http_passthrough.shared.redis_clients import sync_client
from docker_http_passthrough.shared.settings import Settings
from docker_http_passthrough.shared.store import Store
from docker_http_passthrough.worker.health import write_name
from docker_http_passthrough.worker.maintenance import Maintenance

log = logging.getLogger("docker_http_passthrough.worker")


def serve_metrics(port: int) -> None:
    try:
        start_http_server(port)
        log.info("worker metrics on port %d (/metrics)", port)
    except OSError as exc:  # e.g. two workers on one host: the second one runs without its own endpoint
        log.warning("worker metrics port %d unavailable (%s); set WORKER_METRICS_PORT", port, exc)


def run(settings: Settings, *, burst: bool = False, name: str | None = None, name_file: str | None = None) -> None:
    if not settings.redis_url:
        raise SystemExit("the worker needs REDIS_URL: it takes preparation jobs from Redis")
    if settings.worker_metrics_port:
        serve_metrics(settings.worker_metrics_port)
    store = Store(settings.cache_dir)
    swept = store.sweep_partials()
    if swept:
        log.info("removed %d partial files left by crashed writers", swept)
    queue = PreparationQueue(sync_client(settings), settings.queue_name)
    worker = queue.worker(name)
    if name_file:
        write_name(name_file, worker.name)  # for `worker-health --name-file`
    # Its own connection: a job's long Redis calls never delay a heartbeat.
    maintenance = Maintenance(settings, PreparationQueue(sync_client(settings), settings.queue_name), worker, store)
    maintenance.start()
    try:
        worker.work(burst=burst, with_scheduler=False)
    finally:
        maintenance.stop()
