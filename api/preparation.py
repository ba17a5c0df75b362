"""Getting an image prepared: one preparation per image, shared by every request that asks for it.

Two-tier: an RQ job per image key, enqueued once; requests wait for its outcome on a Redis channel (one
subscription per API process, no thread per waiter) and give up within bounded times when its worker dies.
Embedded: the same preparation as an asyncio task inside the API process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from datetime import timezone
from typing import Iterator, Protocol

import anyio.to_thread
import httpx
import redis as redis_sync
import redis.asyncio as aioredis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.utils import utcparse

from docker_http_passthrough.shared.errors import PassthroughError, TimedOut, Unavailable
from docker_http_passthrough.shared.eviction import evict
from docker_http_passthrough.shared.jobs import (
    JOB_FUNCTION,
    OUTCOME_PATTERN,
    JobSpec,
    credentials_key,
    heartbeat_key,
    outcome_key,
    progress_key,
    seal_credentials,
)
from docker_http_passthrough.shared.locks import LocalLocks
from docker_http_passthrough.shared.metrics import WAITING_REQUESTS
from docker_http_passthrough.shared.prepare import Progress, image_key, job_id_for, prepare_image
from docker_http_passthrough.shared.registry import Credentials, RegistryClient
from docker_http_passthrough.shared.settings import Settings
from docker_http_passthrough.shared.store import ImageRecord, Store
from docker_http_passthrough.shared.telemetry import inject_context, link_to, tracer

log = logging.getLogger("docker_http_passthrough.api")

ACTIVE = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED, JobStatus.CREATED}
# How often a waiter re-checks the job's state when no outcome message arrives.
CHECK_EVERY = 1.0
# Requests waiting on the same job share one look at its state for this long.
LOOK_SHARED_FOR = 0.5
# A job that started this recently may not have written its first heartbeat yet.
START_GRACE = 3.0


class Preparer(Protocol):
    async def start(self, spec: JobSpec, credentials: Credentials | None, token: str | None) -> str:
        """Make sure a preparation runs (or ran); returns its job id without waiting."""

    async def ensure(self, spec: JobSpec, credentials: Credentials | None, token: str | None) -> ImageRecord:
        """Start if needed and wait for the prepared image."""

    async def status(self, job_id: str) -> dict | None:
        """{"state": queued|running|done|failed, progress…, "error": …}; None for an unknown job id."""

    async def close(self) -> None: ...


def _key_of_job(job_id: str) -> str | None:
    return job_id.removeprefix("prepare-") if job_id.startswith("prepare-") else None


@contextlib.contextmanager
def _wait_span(job_id: str, started_by: dict | None) -> Iterator[None]:
    """The request's span for waiting on a preparation; linked to the starter's trace when it joined one."""
    WAITING_REQUESTS.inc()
    try:
        with tracer().start_as_current_span(
                "wait_for_preparation", links=link_to(started_by) if started_by else None,
                attributes={"dhp.job.id": job_id, "dhp.job.joined": started_by is not None}):
            yield
    finally:
        WAITING_REQUESTS.dec()


def _key(spec: JobSpec) -> str:
    return image_key(spec.registry.api_url, spec.repository, spec.manifest_digest)


class EmbeddedPreparer:
    def __init__(self, settings: Settings, store: Store, http: httpx.AsyncClient):
        self.settings = settings
        self.store = store
        self.http = http
        self.locks = LocalLocks()
        self.running: dict[str, tuple[asyncio.Task, Progress, dict]] = {}
        self.failures: dict[str, tuple[float, dict]] = {}  # recent failures, for the status route

    async def _run(self, spec: JobSpec, credentials: Credentials | None, token: str | None,
                   progress: Progress) -> ImageRecord:
        client = RegistryClient(self.http, spec.registry, spec.repository, credentials, token)
        record = await prepare_image(client, self.store, spec.manifest_digest, self.locks,
                                     self.settings.layer_concurrency, progress)
        await anyio.to_thread.run_sync(evict, self.store, self.settings.cache_max_bytes)
        return record

    def _finished(self, job_id: str, task: asyncio.Task) -> None:
        # Forget the task when it ends, success or failure, so a later request retries a failure.
        self.running.pop(job_id, None)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            error = exc.to_dict() if isinstance(exc, PassthroughError) else {
                "error": "preparation_failed", "status": 502, "message": f"{type(exc).__name__}: {exc}"}
            self.failures[job_id] = (time.time(), error)

    async def start(self, spec: JobSpec, credentials: Credentials | None, token: str | None) -> str:
        job_id = job_id_for(_key(spec))
        if job_id not in self.running and self.store.get_image(_key(spec)) is None:
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
            record = self.store.get_image(_key(spec))
            if record is not None:
                return record
            raise PassthroughError.from_dict(self.failures.get(job_id, (0, {}))[1])
        starter = entry[2]
        joined = starter != inject_context()
        try:
            with _wait_span(job_id, starter if joined else None):
                # shield: a client that hangs up does not cancel the preparation others wait for.
                return await asyncio.wait_for(asyncio.shield(entry[0]), self.settings.prepare_timeout)
        except TimeoutError:
            raise TimedOut(f"preparing the image took longer than PREPARE_TIMEOUT={self.settings.prepare_timeout:g}s") from None

    async def status(self, job_id: str) -> dict | None:
        key = _key_of_job(job_id)
        if key is None:
            return None
        if job_id in self.running:
            return {"state": "running", **self.running[job_id][1].as_dict()}
        if self.store.get_image(key) is not None:
            return {"state": "done"}
        if job_id in self.failures:
            return {"state": "failed", "error": self.failures[job_id][1]}
        return None

    async def close(self) -> None:
        for task, _progress, _trace in list(self.running.values()):
            task.cancel()


class OutcomeWatcher:
    """One pattern subscription per process; wakes the waiters of a job when its outcome is published."""

    def __init__(self, client: aioredis.Redis):
        self.client = client
        self.waiters: dict[str, set[asyncio.Event]] = {}
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        while True:
            try:
                pubsub = self.client.pubsub()
                await pubsub.psubscribe(OUTCOME_PATTERN)
                async for message in pubsub.listen():
                    if message.get("type") == "pmessage":
                        channel = message["channel"].decode()
                        for event in self.waiters.get(channel, ()):
                            event.set()
            except asyncio.CancelledError:
                raise
            except Exception:  # waiters fall back to CHECK_EVERY polling meanwhile
                log.warning("outcome subscription lost; reconnecting", exc_info=True)
                await asyncio.sleep(1.0)

    async def wait(self, job_id: str, timeout: float) -> None:
        channel = outcome_key(job_id)
        event = asyncio.Event()
        self.waiters.setdefault(channel, set()).add(event)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self.waiters[channel].discard(event)
            if not self.waiters[channel]:
                del self.waiters[channel]

    async def close(self) -> None:
        if self.task:
            self.task.cancel()


class QueuePreparer:
    def __init__(self, settings: Settings, store: Store):
        self.settings = settings
        self.store = store
        self.sync = redis_sync.Redis.from_url(settings.redis_url)
        # A fleet means hundreds of waiting requests: they queue for a connection instead of failing when all
        # are busy (the default pool raises at 100).
        self.redis = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=64, timeout=30))
        self.queue = Queue(settings.queue_name, connection=self.sync)
        self.watcher = OutcomeWatcher(self.redis)
        self.watcher.start()
        self.starting: dict[str, asyncio.Future] = {}
        self.looks: dict[str, tuple[float, asyncio.Future]] = {}
        self.enqueue_threads = anyio.CapacityLimiter(4)

    def _job_lost(self, job: Job) -> bool:
        """A started job whose worker stopped beating: its worker died and RQ has not noticed yet."""
        if job.get_status(refresh=False) != JobStatus.STARTED or self.sync.exists(heartbeat_key(job.id)):
            return False
        started = job.started_at.timestamp() if job.started_at else 0.0
        return time.time() - started > START_GRACE

    def _settle(self, job: Job) -> None:
        """The job reported its outcome but RQ may not have marked it finished yet: replacing it now would let
        the old worker's bookkeeping overwrite the new job. Give RQ a moment."""
        deadline = time.monotonic() + 5.0
        while job.get_status(refresh=True) in ACTIVE and time.monotonic() < deadline:
            time.sleep(0.05)

    def _enqueue_unless_running(self, spec: JobSpec, job_id: str, sealed: bytes | None,
                                trace_context: dict) -> dict | None:
        """Runs in a thread (RQ is synchronous). A short Redis lock makes check-then-enqueue atomic across APIs.
        Returns the trace context of the request that started the job when this one joins it."""
        with self.sync.lock(f"dhp:enqueue:{job_id}", timeout=30, blocking_timeout=30):
            if self.store.get_image(_key(spec)) is not None:
                return None
            try:
                job = Job.fetch(job_id, connection=self.sync)
            except NoSuchJobError:
                job = None
            if job is not None:
                reported = self.sync.exists(outcome_key(job_id))
                if not reported and job.get_status(refresh=False) in ACTIVE and not self._job_lost(job):
                    return job.meta.get("trace") or {}
                if reported:
                    self._settle(job)
                # Failed, finished without output, or orphaned: RQ keeps such ids for a long time; replace it.
                job.delete()
            pipe = self.sync.pipeline()
            pipe.delete(outcome_key(job_id), heartbeat_key(job_id), progress_key(job_id))
            if sealed is not None:
                pipe.set(credentials_key(job_id), sealed, ex=self.settings.job_timeout + 600)
            pipe.execute()
            self.queue.enqueue(
                JOB_FUNCTION,
                kwargs=spec.as_kwargs(),
                job_id=job_id,
                job_timeout=self.settings.job_timeout,
                result_ttl=600,
                failure_ttl=600,
                description=f"prepare {spec.registry.name}/{spec.repository}@{spec.manifest_digest}",
                meta={"trace": trace_context},
            )
            return None

    async def _live_workers(self) -> int:
        members = await self.redis.smembers(f"rq:workers:{self.settings.queue_name}")
        if not members:
            return 0
        return int(await self.redis.exists(*members))

    async def _look(self, job_id: str) -> dict:
        """One look at a job: {"state": done|failed|running|queued|gone, "error": {...}, "problem": why it may
        never finish}. A running job without a heartbeat for WORKER_LOST_TIMEOUT has failed: its worker died."""
        outcome = await self.redis.get(outcome_key(job_id))
        if outcome is not None:
            result = json.loads(outcome)
            if result.get("ok"):
                return {"state": "done"}
            return {"state": "failed", "error": {k: v for k, v in result.items() if k != "ok"}}
        status, started_at = await self.redis.hmget(f"rq:job:{job_id}", "status", "started_at")
        status = status.decode() if status else None
        if status is None:
            return {"state": "gone"}
        if status == JobStatus.FINISHED:
            return {"state": "done"}
        if status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
            # No outcome: the job was killed (job timeout, or its worker died and RQ noticed).
            return {"state": "failed", "error": {
                "error": "preparation_failed", "status": 502,
                "message": f"the preparation job ended ({status}) without a result: its worker was killed or it "
                           "ran past JOB_TIMEOUT; see the worker logs"}}
        if status == JobStatus.STARTED:
            # The job's last act sets its outcome and drops its heartbeat in one transaction: look at the
            # outcome again before calling a job without heartbeat lost.
            if not await self.redis.exists(heartbeat_key(job_id)) and not await self.redis.exists(outcome_key(job_id)):
                started = utcparse(started_at.decode()).replace(tzinfo=timezone.utc).timestamp() if started_at else 0
                if time.time() - started > START_GRACE:
                    return {"state": "failed", "error": TimedOut(
                        "the worker preparing this image stopped responding (no heartbeat for "
                        f"WORKER_LOST_TIMEOUT={self.settings.worker_lost_timeout:g}s)", code="worker_lost").to_dict()}
            return {"state": "running"}
        problem = None if await self._live_workers() else "no preparation worker is running"
        return {"state": "queued", "problem": problem}

    async def _shared_look(self, job_id: str) -> dict:
        """Waiters for the same job in this process share one look per LOOK_SHARED_FOR seconds."""
        now = time.monotonic()
        entry = self.looks.get(job_id)
        if entry is None or now - entry[0] > LOOK_SHARED_FOR:
            entry = (now, asyncio.ensure_future(self._look(job_id)))
            self.looks[job_id] = entry
        return await asyncio.shield(entry[1])

    async def _wait(self, job_id: str) -> None:
        try:
            await self._wait_for_outcome(job_id)
        finally:
            entry = self.looks.get(job_id)
            if entry is not None and entry[1].done():
                del self.looks[job_id]

    async def _wait_for_outcome(self, job_id: str) -> None:
        deadline = time.monotonic() + self.settings.prepare_timeout
        trouble_since: float | None = None
        while True:
            look = await self._shared_look(job_id)
            if look["state"] == "done":
                return
            if look["state"] == "failed":
                raise PassthroughError.from_dict(look["error"])
            if look["state"] == "gone":
                raise Unavailable("the preparation job disappeared from Redis before it finished")
            now = time.monotonic()
            problem = look.get("problem")
            if problem is None:
                trouble_since = None
            elif trouble_since is None:
                trouble_since = now
            elif now - trouble_since > self.settings.worker_lost_timeout:
                raise TimedOut(f"{problem} (waited {self.settings.worker_lost_timeout:g}s, WORKER_LOST_TIMEOUT)",
                               code="no_worker")
            if now > deadline:
                raise TimedOut(f"preparing the image took longer than PREPARE_TIMEOUT={self.settings.prepare_timeout:g}s")
            await self.watcher.wait(job_id, min(CHECK_EVERY, max(deadline - now, 0.01)))

    async def start(self, spec: JobSpec, credentials: Credentials | None, token: str | None) -> str:
        return (await self._start(spec, credentials))[0]

    async def _start(self, spec: JobSpec, credentials: Credentials | None) -> tuple[str, dict | None]:
        """(job id, trace context of the request that started the job when another request did)."""
        job_id = job_id_for(_key(spec))
        own_context = inject_context()
        sealed = None
        if spec.credential_source == "client":
            if not self.settings.credentials_key:
                raise Unavailable("two-tier mode needs CREDENTIALS_KEY (the same on API and workers) to hand the "
                                  "client's registry credentials to a worker", code="credentials_key_missing")
            sealed = seal_credentials(credentials, self.settings.credentials_key)
        # Requests for the same image in this process share one enqueue check (a fleet arrives at once); the
        # checks run on their own few threads so they never starve the threads that read archive files.
        pending = self.starting.get(job_id)
        if pending is None:
            pending = asyncio.ensure_future(anyio.to_thread.run_sync(
                self._enqueue_unless_running, spec, job_id, sealed, own_context, limiter=self.enqueue_threads))
            self.starting[job_id] = pending
            pending.add_done_callback(lambda _f: self.starting.pop(job_id, None))
        try:
            started_by = await asyncio.shield(pending)
        except redis_sync.RedisError as exc:
            raise Unavailable(f"Redis is unreachable: {type(exc).__name__}") from None
        # A request that asks twice (early start, then wait) finds its own job: that is not joining.
        return job_id, (started_by if started_by and started_by != own_context else None)

    async def ensure(self, spec: JobSpec, credentials: Credentials | None, token: str | None) -> ImageRecord:
        key = _key(spec)
        job_id, started_by = await self._start(spec, credentials)
        if self.store.get_image(key) is None:
            with _wait_span(job_id, started_by):
                try:
                    await self._wait(job_id)
                except aioredis.RedisError as exc:
                    raise Unavailable(f"Redis is unreachable: {type(exc).__name__}") from None
        record = self.store.get_image(key)
        if record is None:
            raise Unavailable("the preparation finished but the image is not in CACHE_DIR: do the API and the "
                              "workers share the same volume?", code="store_mismatch")
        return record

    async def status(self, job_id: str) -> dict | None:
        key = _key_of_job(job_id)
        if key is None:
            return None
        if self.store.get_image(key) is not None:
            return {"state": "done"}
        look = await self._look(job_id)
        if look["state"] == "gone":
            return None
        progress = {k.decode(): int(v) for k, v in (await self.redis.hgetall(progress_key(job_id))).items()}
        return {**{k: v for k, v in look.items() if v is not None}, **progress}

    async def close(self) -> None:
        await self.watcher.close()
        await self.redis.aclose()
        self.sync.close()
