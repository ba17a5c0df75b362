"""Getting an image prepared: one preparation per image, shared by every request that asks for it.

Two preparers answer the same calls — `start` (make sure it runs), `ensure` (wait for the prepared image),
`hold` (keep it running while a stream needs it; returns the release), `state` (one look, shared by all who wait
on the job), `status` (for the status route), `close`:
- `QueuePreparer` (two-tier, `queue_preparer`): an RQ job per image key, run by the workers;
- `EmbeddedPreparer` (`embedded_preparer`): the same preparation as an asyncio task in the API process.
This module holds what both share (and `PreparationWatch`, a request's hold on its preparation while its
response streams); the app picks a preparer for the settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Iterator, Protocol

from docker_http_passthrough.shared.errors import PassthroughError, TimedOut
from docker_http_passthrough.shared.jobs import JobSpec
from docker_http_passthrough.shared.metrics import WAITING_REQUESTS
from docker_http_passthrough.shared.store import ImageRecord
from docker_http_passthrough.shared.targets import Credentials
from docker_http_passthrough.shared.telemetry import link_to, tracer

log = logging.getLogger("docker_http_passthrough.api")

STATES = ("queued", "running", "done", "failed", "gone")
# Error codes of a preparation whose process died (not of one that failed): running it again may well succeed.
DIED = ("worker_lost", "job_killed")
# How often one request starts a preparation again after its worker died.
RESTARTS = 2


@dataclass(frozen=True)
class JobState:
    state: str  # one of STATES; "gone": no such job (never started, or forgotten)
    error: PassthroughError | None = None  # why it failed
    problem: str | None = None  # why a queued job may never run

    @property
    def ended(self) -> bool:
        return self.state in ("done", "failed", "gone")

    def as_dict(self) -> dict:
        """For the status route."""
        body: dict = {"state": self.state}
        if self.error is not None:
            body["error"] = self.error.to_dict()
        if self.problem is not None:
            body["problem"] = self.problem
        return body


@contextlib.contextmanager
def wait_span(job_id: str, started_by: dict | None) -> Iterator[None]:
    """The request's span for waiting on a preparation; linked to the starter's trace when it joined one."""
    WAITING_REQUESTS.inc()
    try:
        with tracer().start_as_current_span(
                "wait_for_preparation", links=link_to(started_by) if started_by else None,
                attributes={"dhp.job.id": job_id, "dhp.job.joined": started_by is not None}):
            yield
    finally:
        WAITING_REQUESTS.dec()


class Preparer(Protocol):
    async def ensure(self, spec: JobSpec, credentials: Credentials | None, token: str | None) -> ImageRecord: ...

    async def state(self, job_id: str) -> JobState: ...


def _retrieve(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()  # looked at: a stream its client left does not log "never retrieved"


class PreparationWatch:
    """A request's hold on its preparation while its response is planned and streamed: the preparer's `ensure`
    runs as a task beside it (with the preparer's own rules for lost workers and timeouts); when the worker
    preparing the image died, the preparation is started again, at most RESTARTS times, and the stream goes on
    with the new run's output — if a worker takes it up within `pick_up` seconds (WORKER_LOST_TIMEOUT)."""

    def __init__(self, preparer: Preparer, spec: JobSpec, credentials: Credentials | None, token: str | None,
                 pick_up: float):
        self.preparer, self.spec, self.credentials, self.token = preparer, spec, credentials, token
        self.pick_up = pick_up
        self.restarts = 0
        self.restarted_at: float | None = None  # until a worker took the restarted preparation up
        self.task = self._ensure()

    def _ensure(self) -> asyncio.Task:
        task = asyncio.ensure_future(self.preparer.ensure(self.spec, self.credentials, self.token))
        task.add_done_callback(_retrieve)
        return task

    async def outcome(self) -> ImageRecord | None:
        """The prepared image once it is there, None while the preparation runs; raises its error once it
        failed for good."""
        if not self.task.done():
            await self._picked_up()
            return None
        error = self.task.exception()
        if error is None:
            return self.task.result()
        if isinstance(error, PassthroughError) and error.code in DIED and self.restarts < RESTARTS:
            self.restarts += 1
            log.warning("the preparation of %s@%s died (%s); starting it again", self.spec.repository,
                        self.spec.manifest_digest, error.message)
            self.task = self._ensure()
            self.restarted_at = time.monotonic()
            return None
        raise error

    async def _picked_up(self) -> None:
        """A restarted preparation that no worker takes up is given up after `pick_up` seconds."""
        if self.restarted_at is None:
            return
        if (await self.preparer.state(self.spec.job_id)).state in ("running", "done"):
            self.restarted_at = None
        elif time.monotonic() - self.restarted_at > self.pick_up:
            raise TimedOut(f"the preparation was started again after its worker died, but no worker took it up "
                           f"within WORKER_LOST_TIMEOUT={self.pick_up:g}s", code="no_worker")

    def close(self) -> None:
        self.task.cancel()
