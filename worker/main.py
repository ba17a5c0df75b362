"""`docker-http-passthrough worker`: an RQ worker on the preparation queue."""

from __future__ import annotations

import logging

from redis import Redis
from rq import Queue, Worker

from shared.settings import Settings
from shared.store import Store

log = logging.getLogger("docker_http_passthrough.worker")


def run(settings: Settings, *, burst: bool = False, name: str | None = None) -> None:
    if not settings.redis_url:
        raise SystemExit("the worker needs REDIS_URL: it takes preparation jobs from Redis")
    swept = Store(settings.cache_dir).sweep_partials()
    if swept:
        log.info("removed %d partial files left by crashed writers", swept)
    connection = Redis.from_url(settings.redis_url)
    queue = Queue(settings.queue_name, connection=connection)
    worker = Worker([queue], connection=connection, name=name)
    worker.work(burst=burst, with_scheduler=False)
