"""`docker-http-passthrough worker-health`: is this container's RQ worker registered and alive?

The worker records its RQ name in a file (`worker --name-file`); the health check reads it and asks RQ
(`PreparationQueue.worker_health`): registered, and an RQ heartbeat within MAX_HEARTBEAT_AGE seconds (an idle
worker beats every WORKER_TTL - 15 s) or busy with a job that beats.
"""

from __future__ import annotations

import sys
from pathlib import Path

from redis import Redis, RedisError

from docker_http_passthrough.shared.job_queue import WORKER_TTL, PreparationQueue
from docker_http_passthrough.shared.settings import Settings

MAX_HEARTBEAT_AGE = WORKER_TTL + 30


def write_name(path: str, name: str) -> None:
    """Record the worker's name for the health check (written whole: temp file, rename)."""
    target = Path(path)
    partial = target.with_name(f".{target.name}.partial")
    partial.write_text(name + "\n")
    partial.replace(target)


def read_name(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text().strip() or None
    except FileNotFoundError:
        raise SystemExit(f"unhealthy: {path} does not exist yet (the worker has not started)") from None


def health_check(settings: Settings, *, name: str | None = None, name_file: str | None = None,
                 max_age: float = MAX_HEARTBEAT_AGE) -> None:
    """Exit 0 when the worker is registered and beating, 1 (with the reason on stderr) when not."""
    if not settings.redis_url:
        raise SystemExit("unhealthy: REDIS_URL is not set")
    name = name or read_name(name_file)
    queue = PreparationQueue(Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5),
                             settings.queue_name)
    try:
        healthy, found = queue.worker_health(name, max_age)
    except RedisError as exc:
        healthy, found = False, f"Redis is unreachable ({type(exc).__name__})"
    finally:
        queue.close()
    print(("healthy: " if healthy else "unhealthy: ") + found, file=sys.stdout if healthy else sys.stderr)
    raise SystemExit(0 if healthy else 1)
