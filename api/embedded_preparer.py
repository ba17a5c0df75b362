"""Embedded mode: the preparation runs as an asyncio task inside the API process (no Redis, no workers)."""

from __future__ import annotations

import asyncio
import time

from docker_http_passthrough.api.preparation import JobState, wait_span
from docker_http_passthrough.shared.errors import PassthroughError, PreparationFailed, TimedOut, failure_of
from docker_http_passthrough.shared.jobs import JobSpec, Progress, key_of_job
from docker_http_passthrough.shared.locks import LocalLocks, Locks
from docker_http_passthrough.shared.prepare import prepare_image
from docker_http_passthrough.shared.registry import Registries, RegistryClient
from docker_http_passthrough.shared.settings import Settings
from docker_http_passthrough.shared.store import ImageRecord, Store
from docker_http_passthrough.shared.targets import Credentials
from docker_http_passthrough.shared.telemetry import inject_context


class EmbeddedPreparer:
    def __init__(self, settings: Settings, store: Store, registries: Registries, locks: Locks | None = None):
        self.settings = settings
        self.store = store
        self.registries = registries
        self.locks = locks or LocalLocks()  # two-tier without CREDENTIALS_KEY: the workers' Redis locks
        self.running: dict[str, tuple[asyncio.Task, Progress, dict]] = {}
        self.failures: dict[str, tuple[float, PassthroughError]] = {}  # recent failures, for the status route

    async def _run(self, spec: JobSpec, credentials: Credentials | None, token: str | None,
                   progress: Progress) -> ImageRecord:
        client = RegistryClient(self.registries, spec.registry, spec.repository, credentials, token)
        return await prepare_image(client, self.store, spec.manifest_digest, self.locks,
                                   self.settings.layer_concurrency, progress, self.settings.cache_max_bytes)

    def _finished(self, job_id: str, task: asyncio.Task) -> None:
        # Forget the task when it ends, success or failure, so a later request retries a failure.
        self.running.pop(job_id, None)
        if not task.cancelled() and task.exception() is not None:
            self.failures[job_id] = (time.time(), failure_of(task.exception()))

    async def start(self, spec: JobSpec, credentials: Credentials | None, token: str | None) -> str:
        job_id = spec.job_id
        if job_id not in self.running and self.store.get_image(spec.key) is None:
            progress = Progress()
            task = asyncio.create_task(self._run(spec, credentials, token, progress))
            self.running[job_id] = (task, progress, inject_context())
            self.failures.pop(job_id, None)
            task.add_done_callback(lambda t: self._finished(job_id, t))
        return job_id

    async def ensure(self, spec: JobSpec, credentials: Credentials | None, token: str | None) -> ImageRecord:
        job_id = await self.start(spec, credentials, token)
        entry = self.running.get(job_id)
        if entry is None:  # prepared meanwhile
            record = self.store.get_image(spec.key)
            if record is not None:
                return record
            failed = self.failures.get(job_id)
            raise failed[1] if failed else PreparationFailed("preparation failed")
        starter = entry[2]
        joined = starter != inject_context()
        try:
            with wait_span(job_id, starter if joined else None):
                # shield: a client that hangs up does not cancel the preparation others wait for.
                return await asyncio.wait_for(asyncio.shield(entry[0]), self.settings.prepare_timeout)
        except TimeoutError:
            raise TimedOut(f"preparing the image took longer than PREPARE_TIMEOUT={self.settings.prepare_timeout:g}s") from None

    async def state(self, job_id: str) -> JobState:
        key = key_of_job(job_id)
        if job_id in self.running:
            return JobState("running")
        if key is not None and self.store.get_image(key) is not None:
            return JobState("done")
        if job_id in self.failures:
            return JobState("failed", self.failures[job_id][1])
        return JobState("gone")

    async def status(self, job_id: str) -> dict | None:
        state = await self.state(job_id)
        if state.state == "gone":
            return None
        progress = self.running[job_id][1].as_dict() if state.state == "running" else {}
        return {**state.as_dict(), **progress}

    async def close(self) -> None:
        for task, _progress, _trace in list(self.running.values()):
            task.cancel()
