"""Embedded mode: the preparation runs as an asyncio task inside the API process (no Redis, no workers).

A preparation runs while someone needs it: a request waiting for it (`ensure`), an early-start stream sending
it (`hold`), or a pre-warm (a hold never released). When the last one leaves, it goes on for ABANDONED_AFTER
seconds (a device that retries joins it again), then it is cancelled: its upstream connections close and its
temporary files go. (In two-tier mode a job is not cancelled — others may join it at any time — and a hostile
registry's transfer ends at its deadline.)

With several API processes (`serve --workers N`) one of them prepares a given image and the others wait for it
(`job_files`), and two preparations needing the same layer download it once (file locks in the store).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from docker_http_passthrough.api.job_files import JobFiles
from docker_http_passthrough.api.preparation import JobState, wait_span
from docker_http_passthrough.shared.errors import PassthroughError, PreparationFailed, TimedOut, failure_of
from docker_http_passthrough.shared.jobs import JobSpec, Progress, key_of_job
from docker_http_passthrough.shared.locks import FileLocks, Locks
from docker_http_passthrough.shared.prepare import prepare_image
from docker_http_passthrough.shared.registry import Registries, RegistryClient
from docker_http_passthrough.shared.settings import Settings
from docker_http_passthrough.shared.store import ImageRecord, Store
from docker_http_passthrough.shared.targets import Credentials
from docker_http_passthrough.shared.telemetry import inject_context

log = logging.getLogger("docker_http_passthrough.api")

# Seconds a preparation nobody needs any more goes on before it is cancelled.
ABANDONED_AFTER = 10.0


class EmbeddedPreparer:
    def __init__(self, settings: Settings, store: Store, registries: Registries, locks: Locks | None = None):
        self.settings = settings
        self.store = store
        self.registries = registries
        file_locks = FileLocks(store.root / "locks")
        self.locks = locks or file_locks  # two-tier without CREDENTIALS_KEY: the workers' Redis locks
        self.job_files = JobFiles(file_locks)
        self.running: dict[str, tuple[asyncio.Task, Progress, dict]] = {}
        self.failures: dict[str, tuple[float, PassthroughError]] = {}  # recent failures, for the status route
        self.holders: dict[str, int] = {}  # who needs each running preparation
        self.abandoning: dict[str, asyncio.TimerHandle] = {}

    async def _run(self, spec: JobSpec, credentials: Credentials | None, token: str | None,
                   progress: Progress) -> ImageRecord:
        client = RegistryClient(self.registries, spec.registry, spec.repository, credentials, token)
        async with self.job_files.running(spec.job_id, progress):
            record = self.store.get_image(spec.key)  # prepared by another process while this one waited
            if record is not None:
                return record
            return await prepare_image(client, self.store, spec.manifest_digest, self.locks,
                                       self.settings.layer_concurrency, progress, self.settings.cache_max_bytes)

    def _finished(self, job_id: str, task: asyncio.Task) -> None:
        # Forget the task when it ends, success or failure, so a later request retries a failure.
        if job_id in self.running and self.running[job_id][0] is task:
            del self.running[job_id]
            self.holders.pop(job_id, None)  # a pre-warm's hold is never released: forget it with the job
            timer = self.abandoning.pop(job_id, None)
            if timer is not None:
                timer.cancel()
        if not task.cancelled() and task.exception() is not None:
            self.failures[job_id] = (time.time(), failure_of(task.exception()))

    def hold(self, job_id: str) -> Callable[[], None]:
        """Keep the running preparation going until the returned function is called."""
        if job_id not in self.running:
            return lambda: None
        self.holders[job_id] = self.holders.get(job_id, 0) + 1
        timer = self.abandoning.pop(job_id, None)
        if timer is not None:
            timer.cancel()
        released = False

        def release() -> None:
            nonlocal released
            if released or job_id not in self.holders:  # released already, or the preparation ended
                return
            released = True
            self.holders[job_id] -= 1
            if not self.holders[job_id]:
                del self.holders[job_id]
                if job_id in self.running:
                    loop = asyncio.get_running_loop()
                    self.abandoning[job_id] = loop.call_later(ABANDONED_AFTER, self._abandon, job_id)

        return release

    def _abandon(self, job_id: str) -> None:
        self.abandoning.pop(job_id, None)
        if self.holders.get(job_id) or job_id not in self.running:
            return
        task = self.running.pop(job_id)[0]  # forgotten at once: a request arriving now starts afresh
        log.info("cancelling the preparation %s: nobody has needed it for %gs", job_id, ABANDONED_AFTER)
        task.cancel()

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
        release = self.hold(job_id)
        try:
            with wait_span(job_id, starter if joined else None):
                # shield: a client that hangs up does not cancel the preparation others wait for (abandoning does).
                return await asyncio.wait_for(asyncio.shield(entry[0]), self.settings.prepare_timeout)
        except TimeoutError:
            raise TimedOut(f"preparing the image took longer than PREPARE_TIMEOUT={self.settings.prepare_timeout:g}s") from None
        finally:
            release()

    async def state(self, job_id: str) -> JobState:
        key = key_of_job(job_id)
        if job_id in self.running:
            return JobState("running")
        if key is not None and self.store.get_image(key) is not None:
            return JobState("done")
        if job_id in self.failures:
            return JobState("failed", self.failures[job_id][1])
        elsewhere = self.job_files.look(job_id)  # in another API process of this server
        if elsewhere is not None:
            state, body = elsewhere
            return JobState(state, JobFiles.error_of(body) if state == "failed" else None)
        return JobState("gone")

    async def status(self, job_id: str) -> dict | None:
        state = await self.state(job_id)
        if state.state == "gone":
            return None
        progress: dict = {}
        if state.state == "running":
            progress = self.running[job_id][1].as_dict() if job_id in self.running else {}
            if not any(progress.values()):  # waiting here while another process of this server prepares it
                progress = (self.job_files.look(job_id) or ("", progress))[1]
        return {**state.as_dict(), **progress}

    async def close(self) -> None:
        for timer in self.abandoning.values():
            timer.cancel()
        for task, _progress, _trace in list(self.running.values()):
            task.cancel()
