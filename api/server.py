"""`docker-http-passthrough serve`: the API on uvicorn."""

from __future__ import annotations

import ctypes

import uvicorn

from docker_http_passthrough.api.app import create_app
from docker_http_passthrough.shared.settings import Settings


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates its own arena and keeps what is freed there; with the file-read
    threads that multiplies resident memory under many clients. Two arenas keep it flat (no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def run(settings: Settings, host: str, port: int) -> None:
    limit_malloc_arenas()
    # One process per pod/host; scale out with more replicas behind a load balancer.
    # log_config=None: uvicorn logs through our handlers (text or JSON, LOG_LEVEL).
    uvicorn.run(create_app(settings), host=host, port=port, log_config=None, access_log=False,
                timeout_keep_alive=30)
