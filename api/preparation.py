"""Getting an image prepared: one preparation per image, shared by every request that asks for it.

Two preparers answer the same calls — `start` (make sure it runs), `ensure` (wait for the prepared image),
`hold` (keep it running while a stream needs it; returns the release), `state` (one look, shared by all who wait
on the job), `status` (for the status route), `close`:
- `QueuePreparer` (two-tier, `queue_preparer`): an RQ job per image key, run by the workers;
- `EmbeddedPreparer` (`embedded_preparer`): the same preparation as an asyncio task in the API process.
This module holds what both share; the app picks one for the settings.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

from docker_http_passthrough.shared.errors import PassthroughError
from docker_http_passthrough.shared.metrics import WAITING_REQUESTS
from docker_http_passthrough.shared.telemetry import link_to, tracer

STATES = ("queued", "running", "done", "failed", "gone")


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
