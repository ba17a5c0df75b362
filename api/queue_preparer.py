"""Two-tier mode: an RQ job per image key, enqueued once; requests wait for its outcome.

Waiters are woken by the outcome's publication (`outcome_watcher`: one subscription per API process, no thread
per waiter), and look at their job at most every CHECK_EVERY seconds meanwhile; all waiters of a job in this
process share one look per LOOK_SHARED_FOR seconds. They give up within bounded times when its worker dies
or no worker runs. RQ itself is reached through `shared.job_queue` only, on a few threads of our own.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Callable, TypeVar

import anyio
import anyio.to_thread
import redis as redis_sync
import redis.asyncio as aioredis
from rq.job import JobStatus

from docker_http_passthrough.api.outcome_watcher import OutcomeWatcher
from docker_http_passthrough.api.preparation import JobState, wait_span
from docker_http_passthrough.shared.errors import PassthroughError, PreparationFailed, TimedOut, Unavailable
from docker_http_passthrough.shared.job_queue import KILLED, JobLook, PreparationQueue
from docker_http_passthrough.shared.jobs import JobSpec, key_of_job, seal_credentials
from docker_http_passthrough.shared.settings import Settings
from docker_http_passthrough.shared.store import ImageRecord, Store
from docker_http_passthrough.shared.targets import Credentials
from docker_http_passthrough.shared.telemetry import inject_context

# How often a waiter looks at the job's state when no outcome message arrives.
CHECK_EVERY = 1.0
# Requests waiting on the same job share one look at its state for this long.
LOOK_SHARED_FOR = 0.5
# RQ calls (enqueue checks, looks) run on this many threads, never on those that read archive files.
RQ_THREADS = 4

T = TypeVar("T")


class QueuePreparer:
    def __init__(self, settings: Settings, store: Store, *, queue: PreparationQueue | None = None,
                 redis: aioredis.Redis | None = None):
        self.settings = settings
        self.store = store
        self.queue = queue or PreparationQueue(redis_sync.Redis.from_url(settings.redis_url), settings.queue_name)
        self.redis = redis or aioredis.Redis.from_url(settings.redis_url)  # the outcome subscription
        # A published outcome makes the shared look stale: the woken waiters look again, together.
        self.watcher = OutcomeWatcher(self.redis, on_outcome=lambda job_id: self.looks.pop(job_id, None))
        self.watcher.start()
        self.starting: dict[str, asyncio.Future] = {}
        self.looks: dict[str, tuple[float, asyncio.Future]] = {}
        self.rq_threads = anyio.CapacityLimiter(RQ_THREADS)

    async def _rq(self, call: Callable[[], T]) -> T:
        try:
            return await anyio.to_thread.run_sync(call, limiter=self.rq_threads)
        except redis_sync.RedisError as exc:
            raise Unavailable(f"Redis is unreachable: {type(exc).__name__}") from None

    # --- looking at a job

    async def _look(self, job_id: str) -> JobState:
        return await self._state_of(await self._rq(functools.partial(self.queue.look, job_id)))

    async def _state_of(self, look: JobLook) -> JobState:
        if look.outcome is not None:
            if look.outcome.get("ok"):
                return JobState("done")
            return JobState("failed", PassthroughError.from_dict(look.outcome))
        if look.status is None:
            return JobState("gone")
        if look.status == JobStatus.FINISHED:
            return JobState("done")
        if look.status in KILLED:
            return JobState("failed", PreparationFailed(
                f"the preparation job ended ({look.status}) without a result: its worker was killed or it ran past "
                "JOB_TIMEOUT; see the worker logs"))
        if look.lost:
            return JobState("failed", TimedOut(
                "the worker preparing this image stopped responding (no heartbeat for "
                f"WORKER_LOST_TIMEOUT={self.settings.worker_lost_timeout:g}s)", code="worker_lost"))
        if look.status == JobStatus.STARTED:
            return JobState("running")
        workers = await self._rq(self.queue.live_workers)
        return JobState("queued", problem=None if workers else "no preparation worker is running")

    async def state(self, job_id: str) -> JobState:
        """One look at a job, shared by every caller in this process for LOOK_SHARED_FOR seconds."""
        now = time.monotonic()
        entry = self.looks.get(job_id)
        if entry is None or now - entry[0] > LOOK_SHARED_FOR:
            entry = (now, asyncio.ensure_future(self._look(job_id)))
            self.looks[job_id] = entry
            asyncio.get_running_loop().call_later(LOOK_SHARED_FOR, self._forget_look, job_id, entry)
        return await asyncio.shield(entry[1])

    def _forget_look(self, job_id: str, entry: tuple[float, asyncio.Future]) -> None:
        if self.looks.get(job_id) is entry:
            del self.looks[job_id]

    async def _wait(self, job_id: str) -> None:
        deadline = time.monotonic() + self.settings.prepare_timeout
        trouble_since: float | None = None
        while True:
            state = await self.state(job_id)
            if state.state == "done":
                return
            if state.state == "failed":
                raise PassthroughError.from_dict(state.error.to_dict())  # each waiter raises its own
            if state.state == "gone":
                raise Unavailable("the preparation job disappeared from Redis before it finished")
            now = time.monotonic()
            if state.problem is None:
                trouble_since = None
            elif trouble_since is None:
                trouble_since = now
            elif now - trouble_since > self.settings.worker_lost_timeout:
                raise TimedOut(f"{state.problem} (waited {self.settings.worker_lost_timeout:g}s, "
                               "WORKER_LOST_TIMEOUT)", code="no_worker")
            if now > deadline:
                raise TimedOut(f"preparing the image took longer than PREPARE_TIMEOUT={self.settings.prepare_timeout:g}s")
            await self.watcher.wait(job_id, min(CHECK_EVERY, max(deadline - now, 0.01)))

    # --- starting and waiting

    def _sealed(self, spec: JobSpec, credentials: Credentials | None) -> bytes | None:
        if spec.credential_source != "client":
            return None
        if not self.settings.credentials_key:  # the app never sends such a job here (api/keyless.py)
            raise RuntimeError("client credentials reach a worker only sealed with CREDENTIALS_KEY")
        return seal_credentials(credentials, self.settings.credentials_key)

    async def _start(self, spec: JobSpec, credentials: Credentials | None) -> tuple[str, dict | None]:
        """(job id, trace context of the request that started the job when another request did)."""
        job_id = spec.job_id
        own_context = inject_context()
        sealed = self._sealed(spec, credentials)
        # Requests for the same image in this process share one enqueue check (a fleet arrives at once).
        pending = self.starting.get(job_id)
        if pending is None:
            start = functools.partial(self.queue.start, spec, sealed=sealed, trace=own_context,
                                      job_timeout=self.settings.job_timeout,
                                      prepared=lambda: self.store.get_image(spec.key) is not None)
            pending = asyncio.ensure_future(self._rq(start))
            self.starting[job_id] = pending
            pending.add_done_callback(lambda _f: self._started(job_id))
        started_by = await asyncio.shield(pending)
        # A request that asks twice (early start, then wait) finds its own job: that is not joining.
        return job_id, (started_by if started_by and started_by != own_context else None)

    def _started(self, job_id: str) -> None:
        self.starting.pop(job_id, None)
        # The check may have replaced an ended job: a look taken before says nothing about the new one.
        self.looks.pop(job_id, None)

    async def start(self, spec: JobSpec, credentials: Credentials | None, token: str | None) -> str:
        return (await self._start(spec, credentials))[0]

    def hold(self, job_id: str) -> Callable[[], None]:
        """Jobs run to their end (another API process may need them): nothing to hold."""
        return lambda: None

    async def ensure(self, spec: JobSpec, credentials: Credentials | None, token: str | None) -> ImageRecord:
        job_id, started_by = await self._start(spec, credentials)
        if self.store.get_image(spec.key) is None:
            with wait_span(job_id, started_by):
                await self._wait(job_id)
        record = self.store.get_image(spec.key)
        if record is None:
            raise Unavailable("the preparation finished but the image is not in CACHE_DIR: do the API and the "
                              "workers share the same volume?", code="store_mismatch")
        return record

    async def status(self, job_id: str) -> dict | None:
        key = key_of_job(job_id)
        if key is None:
            return None
        if self.store.get_image(key) is not None:
            return {"state": "done"}
        state = await self._look(job_id)
        if state.state == "gone":
            return None
        return {**state.as_dict(), **await self._rq(functools.partial(self.queue.progress, job_id))}

    async def queue_depth(self) -> int:
        return await self._rq(self.queue.depth)

    async def close(self) -> None:
        await self.watcher.close()
        await self.redis.aclose()
        self.queue.close()
