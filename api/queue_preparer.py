"""Two-tier mode: an RQ job per image key, enqueued once; requests wait for its outcome.

Waiters are woken by the outcome's publication (`outcome_watcher`: one subscription per API process, no thread
per waiter), and look at their job at most every CHECK_EVERY seconds meanwhile; all waiters of a job in this
process share one look per LOOK_SHARED_FOR seconds. A look that finds the job lost (its worker died) runs it
again on a live worker, and the waiters keep waiting; they give up (504) only when no worker is alive to run
it for WORKER_LOST_TIMEOUT. Redis calls ride out blips (`redis_clients`); past REDIS_OUTAGE_TIMEOUT a waiter
gets 503. RQ itself is reached through `shared.job_queue` only, on a few threads of our own.
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
from docker_http_passthrough.shared.job_queue import KILLED, LOSS_CONFIRMED_AFTER, JobLook, PreparationQueue
from docker_http_passthrough.shared.jobs import JobSpec, key_of_job, seal_credentials
from docker_http_passthrough.shared.redis_clients import async_client, sync_client
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
# A Redis call gives up this long after REDIS_OUTAGE_TIMEOUT (its own retries end about then).
OUTAGE_SLACK = 5.0
# A waiter queues its job again at most this often when Redis forgot it.
MAX_RESTARTS = 3

T = TypeVar("T")


class QueuePreparer:
    def __init__(self, settings: Settings, store: Store, *, queue: PreparationQueue | None = None,
                 redis: aioredis.Redis | None = None):
        self.settings = settings
        self.store = store
        self.queue = queue or PreparationQueue(sync_client(settings), settings.queue_name)
        self.redis = redis or async_client(settings)  # the outcome subscription
        # A published outcome makes the shared look stale: the woken waiters look again, together.
        self.watcher = OutcomeWatcher(self.redis, on_outcome=lambda job_id: self.looks.pop(job_id, None))
        self.watcher.start()
        self.starting: dict[str, asyncio.Future] = {}
        self.looks: dict[str, tuple[float, asyncio.Future]] = {}
        self.rq_threads = anyio.CapacityLimiter(RQ_THREADS)
        self.no_worker_since: float | None = None  # monotonic; None while some worker is alive
        self.lost_since: dict[str, float] = {}  # job id → when this process first saw it lost (monotonic)
        self.confirm_loss_after = LOSS_CONFIRMED_AFTER

    async def _rq(self, call: Callable[[], T]) -> T:
        # The client retries through a blip for about REDIS_OUTAGE_TIMEOUT; the bound here also covers the wait
        # for one of the RQ threads, which an outage keeps busy.
        try:
            with anyio.fail_after(self.settings.redis_outage_timeout + OUTAGE_SLACK):
                return await anyio.to_thread.run_sync(call, limiter=self.rq_threads, abandon_on_cancel=True)
        except (redis_sync.RedisError, TimeoutError) as exc:
            self.lost_since.clear()  # what was seen before an outage proves nothing after it
            raise Unavailable(f"Redis did not answer for REDIS_OUTAGE_TIMEOUT={self.settings.redis_outage_timeout:g}s "
                              f"({type(exc).__name__})", code="redis_unavailable") from None

    # --- looking at a job

    async def _look(self, job_id: str) -> JobState:
        look = await self._rq(functools.partial(self.queue.look, job_id))
        if not look.lost:
            self.lost_since.pop(job_id, None)
        elif time.monotonic() - self.lost_since.setdefault(job_id, time.monotonic()) < self.confirm_loss_after:
            return JobState("running")  # lost, or Redis just came back and its worker has not beaten yet
        else:
            # Its worker died: run it again now (once, whoever asks), and keep waiting for the rerun — unless no
            # other worker is alive to run it (the dead one may not have expired yet: it does not count).
            self.lost_since.pop(job_id, None)
            dead = look.worker
            look = await self._rq(functools.partial(self.queue.rerun_if_lost, job_id))
            if look.running_or_waiting and not await self._rq(functools.partial(self.queue.live_workers, dead)):
                return JobState("failed", self._worker_lost(" and no other worker is running (the job waits "
                                                            "for one)"))
        return await self._state_of(look)

    def _worker_lost(self, more: str = "") -> TimedOut:
        return TimedOut("the worker preparing this image stopped responding (no heartbeat for "
                        f"WORKER_LOST_TIMEOUT={self.settings.worker_lost_timeout:g}s){more}", code="worker_lost")

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
                "JOB_TIMEOUT; see the worker logs", code="job_killed"))
        if look.lost:
            return JobState("failed", self._worker_lost())
        if look.status == JobStatus.STARTED:
            return JobState("running")
        return await self._queued()

    async def _queued(self) -> JobState:
        """A queued job's state: waiting, or given up (504) once no worker has been alive for WORKER_LOST_TIMEOUT —
        a fact about the fleet, so measured once per process for every waiter and early-start stream."""
        now = time.monotonic()
        if await self._rq(self.queue.live_workers):
            self.no_worker_since = None
            return JobState("queued")
        if self.no_worker_since is None:
            self.no_worker_since = now
        if now - self.no_worker_since > self.settings.worker_lost_timeout:
            return JobState("failed", TimedOut(
                f"no preparation worker is running (none for WORKER_LOST_TIMEOUT={self.settings.worker_lost_timeout:g}s"
                "; the job stays queued for one)", code="no_worker"))
        return JobState("queued", problem="no preparation worker is running")

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

    async def _wait(self, spec: JobSpec, credentials: Credentials | None) -> None:
        job_id = spec.job_id
        deadline = time.monotonic() + self.settings.prepare_timeout
        restarts = 0
        while True:
            state = await self.state(job_id)
            if state.state == "done":
                return
            if state.state == "failed":
                raise PassthroughError.from_dict(state.error.to_dict())  # each waiter raises its own
            if state.state == "gone":
                # Redis lost it (restarted without its data?): queue it again; the store keeps what was done.
                if self.store.get_image(spec.key) is not None:
                    return
                if restarts == MAX_RESTARTS:
                    raise Unavailable("the preparation job keeps disappearing from Redis before it finishes")
                restarts += 1
                await self._start(spec, credentials)
                continue
            now = time.monotonic()
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
                await self._wait(spec, credentials)
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
