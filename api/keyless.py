"""Two-tier mode without CREDENTIALS_KEY: preparations that need the client's own registry credentials run in
this API process instead of answering 503.

Without a key the credentials cannot be sealed for a worker, and they must never reach Redis in plain text, so
such a preparation runs here, the way embedded mode runs every preparation: same store, and the same Redis
blob locks as the workers, so a layer that a worker is downloading at the same time is still downloaded once.
Everything else (anonymous and settings credentials) still goes to the workers. With CREDENTIALS_KEY set this
class is not used.
"""

from __future__ import annotations

from typing import Callable

from docker_http_passthrough.api.embedded_preparer import EmbeddedPreparer
from docker_http_passthrough.api.preparation import JobState
from docker_http_passthrough.api.queue_preparer import QueuePreparer
from docker_http_passthrough.shared.jobs import JobSpec
from docker_http_passthrough.shared.store import ImageRecord
from docker_http_passthrough.shared.targets import Credentials

STARTUP_NOTE = ("CREDENTIALS_KEY is not set: requests carrying the client's own registry credentials are prepared "
                "inside this API process (they never reach Redis); set CREDENTIALS_KEY, the same on the API and "
                "every worker, to move those preparations to the workers")


class KeylessPreparer:
    def __init__(self, to_workers: QueuePreparer, in_process: EmbeddedPreparer):
        self.to_workers = to_workers
        self.in_process = in_process

    def __getattr__(self, name: str):
        # Everything else is the queue preparer's (queue_depth for the gauge, its RQ queue, ...).
        return getattr(self.to_workers, name)

    def _for(self, spec: JobSpec) -> QueuePreparer | EmbeddedPreparer:
        return self.in_process if spec.credential_source == "client" else self.to_workers

    def _here(self, job_id: str) -> bool:
        # Job ids name the image, not where it runs: a job this process runs or ran is answered here.
        return job_id in self.in_process.running or job_id in self.in_process.failures

    async def start(self, spec: JobSpec, credentials: Credentials | None, token: str | None) -> str:
        return await self._for(spec).start(spec, credentials, token)

    async def ensure(self, spec: JobSpec, credentials: Credentials | None, token: str | None) -> ImageRecord:
        return await self._for(spec).ensure(spec, credentials, token)

    def hold(self, job_id: str) -> Callable[[], None]:
        return (self.in_process if self._here(job_id) else self.to_workers).hold(job_id)

    async def state(self, job_id: str) -> JobState:
        return await (self.in_process if self._here(job_id) else self.to_workers).state(job_id)

    async def status(self, job_id: str) -> dict | None:
        return await (self.in_process if self._here(job_id) else self.to_workers).status(job_id)

    async def close(self) -> None:
        await self.in_process.close()
        await self.to_workers.close()
