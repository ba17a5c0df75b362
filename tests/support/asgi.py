"""The API in this process: the app under httpx's ASGI transport, an RQ worker on a thread, or any ASGI app driven
message by message as a server would drive it.

    async with app_in_process(env) as (app, client):
        response = await client.get("/docker/nginx_latest.tar")

- ``app_in_process(env)``: ``create_app(load_settings(env))`` with its lifespan run by hand, and an httpx client
  that looks like a switch (``User-Agent``, a fixed client address).
- ``thread_worker(redis_url)``: a SimpleWorker on a thread of this process, for two-tier runs whose job must land
  in this process (in-memory spans, monkeypatched settings). The job reads its settings from ``os.environ``.
- ``drive_asgi(app, path, ...)``: one request to any ASGI app, with a client that hangs up (a failing ``send``
  for ASGI spec 2.4, an ``http.disconnect`` for older servers); returns every message the app sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from redis import Redis
from rq import Queue, SimpleWorker
from rq.timeouts import TimerDeathPenalty

from docker_http_passthrough.api.app import create_app
from docker_http_passthrough.shared.settings import load_settings

from tests.support.services import TEST_ALLOWED_HOSTS

CLIENT_ADDRESS = ("192.0.2.7", 50123)
BASE_URL = "http://dhp.test:8080"
QUEUE = "docker-http-passthrough"


@contextlib.asynccontextmanager
async def app_in_process(env: dict[str, str]) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    app = create_app(load_settings({"REGISTRY_ALLOWED_HOSTS": TEST_ALLOWED_HOSTS, **env}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=CLIENT_ADDRESS)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL,
                                     headers={"User-Agent": "Cisco-IOS-XE/17.9"}, timeout=60) as client:
            yield app, client


def embedded_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Settings for an embedded app whose store lives under ``tmp_path``."""
    return {"CACHE_DIR": str(tmp_path / "cache"), **extra}


class _ThreadWorker(SimpleWorker):
    """Runs jobs on a thread of this process: no signal handlers, timeouts by timer, not SIGALRM."""

    death_penalty_class = TimerDeathPenalty

    def _install_signal_handlers(self) -> None:
        pass


@contextlib.contextmanager
def thread_worker(redis_url: str, queue_name: str = QUEUE) -> Iterator[None]:
    """Work ``queue_name`` on a thread until the block ends; an error in the worker fails the caller."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        connection = Redis.from_url(redis_url)
        try:
            while not stop.is_set():
                _ThreadWorker([Queue(queue_name, connection=connection)], connection=connection).work(
                    burst=True, logging_level="WARNING")
                stop.wait(0.05)
        except BaseException as exc:  # surfaced by the test, not lost in the thread
            errors.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=loop, name="rq-simple-worker", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not errors, errors


async def wait_for(predicate: Callable[[], object], timeout: float = 15.0) -> None:
    """Let the loop run until ``predicate()`` holds; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)


async def drive_asgi(app: Any, path: str, *, method: str = "GET", spec: str = "2.4",
                     send_fails_after: int | None = None, disconnect_after: float | None = None) -> list[dict]:
    """Drive ``app`` like an ASGI server would; a client that hangs up shows as a failing send after
    ``send_fails_after`` body messages (spec 2.4) or as an http.disconnect after ``disconnect_after`` seconds."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"host", b"dhp.test:8080"), (b"user-agent", b"switch")],
             "client": ("192.0.2.1", 1234), "server": ("10.0.0.1", 8080)}
    sent: list[dict] = []
    requested = False

    async def receive() -> dict:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(disconnect_after if disconnect_after is not None else 3600)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if send_fails_after is not None and message["type"] == "http.response.body" and \
                len([m for m in sent if m["type"] == "http.response.body"]) >= send_fails_after:
            raise OSError("the client went away")
        sent.append(message)

    await app(scope, receive, send)
    return sent
