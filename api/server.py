"""`docker-http-passthrough serve`: the API on uvicorn."""

from __future__ import annotations

import ctypes
import functools
import logging

import uvicorn

from docker_http_passthrough.api.app import create_app
from docker_http_passthrough.api.connections import GuardedProtocol, limits_from, raise_fd_limit
from docker_http_passthrough.shared.settings import Settings

log = logging.getLogger("docker_http_passthrough.api")


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates its own arena and keeps what is freed there; with the file-read
    threads that multiplies resident memory under many clients. Two arenas keep it flat (no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def run(settings: Settings, host: str, port: int) -> None:
    limit_malloc_arenas()
    limits = limits_from(settings, raise_fd_limit())
    log.info("connections: at most %d per process (MAX_CONNECTIONS%s); HEADER_TIMEOUT=%gs IDLE_TIMEOUT=%gs "
             "SEND_TIMEOUT=%gs", limits.max_connections, "" if settings.max_connections else ", from the fd limit",
             settings.header_timeout, settings.idle_timeout, settings.send_timeout)
    if limits.max_connections < 1000:
        log.warning("fewer than 1000 connections per process: raise the file-descriptor limit (ulimit -n, "
                    "LimitNOFILE, container ulimits) to serve a large fleet at once")
    # One process per pod/host; scale out with more replicas behind a load balancer.
    # log_config=None: uvicorn logs through our handlers (text or JSON, LOG_LEVEL).
    uvicorn.run(create_app(settings), host=host, port=port, log_config=None, access_log=False,
                timeout_keep_alive=settings.idle_timeout,  # type: ignore[arg-type] - a float works
                http=functools.partial(GuardedProtocol, limits=limits),  # type: ignore[arg-type]
                ws="none")  # no WebSocket routes: an Upgrade request is answered as plain HTTP
