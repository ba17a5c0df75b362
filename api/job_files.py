"""Embedded preparations seen from every API process of a server (`serve --workers N`).

Each process has its own preparer, so without this two processes asked for the same cold image would each
prepare it, and a pre-warm started in one would be unknown to the process that answers its /status. So a
preparation runs under a file lock named by its job (`FileLocks` in the store's `locks/`): the process that gets
it prepares, one that finds it taken waits and then takes the image from the store. While it runs, the holder
writes its progress into the lock file (JSON, every PUBLISH_EVERY seconds), and when it fails, its error; any
process reads that for /status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from typing import AsyncIterator

from docker_http_passthrough.shared.errors import PassthroughError, failure_of
from docker_http_passthrough.shared.jobs import Progress
from docker_http_passthrough.shared.locks import FileLocks

PUBLISH_EVERY = 1.0
# How long another process reports a failure it read in a job file (the failing process keeps its own longer).
FAILURE_SHOWN = 300.0


def _write(fd: int, body: dict) -> None:
    data = json.dumps(body).encode()
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))


class JobFiles:
    def __init__(self, locks: FileLocks):
        self.locks = locks

    @contextlib.asynccontextmanager
    async def running(self, job_id: str, progress: Progress) -> AsyncIterator[None]:
        """Hold the job (waiting while another process runs it) and publish `progress` until the block ends. A
        run that failed in another process while this one waited fails this one too, with its error: the
        requests waiting here share that run's outcome, as they would within one process."""
        asked = time.time()
        async with self.locks.hold(f"job-{job_id}") as fd:
            body = self._read(fd)
            if body.get("state") == "failed" and body.get("at", 0) >= asked:
                raise self.error_of(body.get("error") or {})

            async def publish() -> None:
                while True:
                    _write(fd, {"state": "running", **progress.as_dict()})
                    await asyncio.sleep(PUBLISH_EVERY)

            publisher = asyncio.create_task(publish())
            try:
                yield
            except Exception as exc:
                _write(fd, {"state": "failed", "at": time.time(), "error": failure_of(exc).to_dict()})
                raise
            else:
                _write(fd, {"state": "done"})
            finally:
                publisher.cancel()

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            return json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
        except ValueError:  # caught mid-write
            return {}

    def look(self, job_id: str) -> tuple[str, dict] | None:
        """("running", progress) while another process runs the job, ("failed", error) after it failed there
        (for FAILURE_SHOWN seconds), else None."""
        name = f"job-{job_id}"
        try:
            body = json.loads(self.locks.path(name).read_bytes() or b"{}")
        except (OSError, ValueError):  # none, or caught mid-write
            body = {}
        if self.locks.held(name):
            return "running", {k: v for k, v in body.items() if k in Progress.__dataclass_fields__}
        if body.get("state") == "failed" and time.time() - body.get("at", 0) < FAILURE_SHOWN:
            return "failed", body.get("error") or {}
        return None

    @staticmethod
    def error_of(body: dict) -> PassthroughError:
        return PassthroughError.from_dict(body) if body else PassthroughError("preparation failed")
