"""`docker-http-passthrough serve`: the API on uvicorn, in one process or several (`api.supervisor`)."""

from __future__ import annotations

import ctypes
import functools
import gc
import logging
import socket
import sys

import uvicorn

from docker_http_passthrough.api.connections import (
    ConnectionLimits,
    GuardedProtocol,
    current_fd_limit,
    limits_from,
    raise_fd_limit,
)
from docker_http_passthrough.api.supervisor import (
    STARTUP_FAILURE,
    Supervisor,
    bind_reuseport,
    die_with_parent,
    fresh_metrics_dir,
    usable_cpus,
)
from docker_http_passthrough.shared.settings import Settings
from docker_http_passthrough.shared.store import Store

log = logging.getLogger("docker_http_passthrough.api")


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates its own arena and keeps what is freed there; with the file-read
    threads that multiplies resident memory under many clients. Two arenas keep it flat (no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def run(settings: Settings, host: str, port: int, workers: int | None = None) -> int:
    """Serve until stopped; returns the exit status. `workers`: processes (default API_WORKERS, else one per
    usable CPU)."""
    workers = workers or settings.api_workers or usable_cpus()
    limit_malloc_arenas()
    limits = limits_from(settings, raise_fd_limit())  # before the children start: they inherit the limit
    log.info("connections: at most %d per process (MAX_CONNECTIONS%s); HEADER_TIMEOUT=%gs IDLE_TIMEOUT=%gs "
             "SEND_TIMEOUT=%gs", limits.max_connections, "" if settings.max_connections else ", from the fd limit",
             settings.header_timeout, settings.idle_timeout, settings.send_timeout)
    if limits.max_connections < 1000:
        log.warning("fewer than 1000 connections per process: raise the file-descriptor limit (ulimit -n, "
                    "LimitNOFILE, container ulimits) to serve a large fleet at once")
    swept = Store(settings.cache_dir).sweep_partials()  # once, whatever the number of processes
    if swept:
        log.info("removed %d partial files left by crashed writers", swept)
    if workers == 1:
        server = _server(settings, limits, host=host, port=port)
        server.run()
        return 0 if server.started else STARTUP_FAILURE
    try:
        sockets = [bind_reuseport(host, port) for _ in range(workers)]
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, port, exc)
        return 1
    command = [sys.executable, "-m", "docker_http_passthrough", "serve", "--socket-fd"]
    return Supervisor(command, sockets, fresh_metrics_dir()).run()


def serve_socket(settings: Settings, fd: int) -> int:
    """One of several API processes: serve on the listening socket the supervisor bound for it (descriptor `fd`),
    with the limits the supervisor computed for the fd limit it set (inherited)."""
    die_with_parent()
    limit_malloc_arenas()
    sock = socket.socket(fileno=fd)
    server = _server(settings, limits_from(settings, current_fd_limit()))
    server.run(sockets=[sock])
    return 0 if server.started else STARTUP_FAILURE


def _server(settings: Settings, limits: ConnectionLimits, **bind: object) -> uvicorn.Server:
    from docker_http_passthrough.api.app import create_app  # here: after PROMETHEUS_MULTIPROC_DIR is set

    app = create_app(settings)
    # What is loaded now lives as long as the process: out of the collector's sight, each collection (frequent,
    # with a request's many small objects) has that much less to walk.
    gc.collect()
    gc.freeze()
    # log_config=None: uvicorn logs through our handlers (text or JSON, LOG_LEVEL).
    config = uvicorn.Config(app, log_config=None, access_log=False,
                            timeout_keep_alive=settings.idle_timeout,  # type: ignore[arg-type] - a float works
                            http=functools.partial(GuardedProtocol, limits=limits),  # type: ignore[arg-type]
                            ws="none",  # no WebSocket routes: an Upgrade request is answered as plain HTTP
                            **bind)  # type: ignore[arg-type]
    return uvicorn.Server(config)
