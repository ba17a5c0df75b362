"""api.queue_preparer's waiting logic on fakeredis: what a waiting request sees for each state of its job (a lost
job runs again while they wait), how soon it gives up, and that all waiters of a job (early-start streams too)
share one look per interval."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timedelta, timezone

import fakeredis
import pytest
from rq.job import Job, JobStatus

from docker_http_passthrough.api.queue_preparer import CHECK_EVERY, LOOK_SHARED_FOR, QueuePreparer
from docker_http_passthrough.shared.errors import PassthroughError, TimedOut, Unavailable
from docker_http_passthrough.shared.job_queue import START_GRACE, PreparationQueue
from docker_http_passthrough.shared.jobs import JobSpec, heartbeat_key, outcome_key
from docker_http_passthrough.shared.presence import Presence
from docker_http_passthrough.shared.settings import Settings
from docker_http_passthrough.shared.store import ImageRecord, PreparedLayer, Store
from tests.support.images import sha

CONFIRM = 0.5  # LOSS_CONFIRMED_AFTER, shortened
SPEC = JobSpec({"api_url": "https://reg.example", "name": "reg.example", "token_url": None, "service": None,
                "basic_only": False}, "team/app", "sha256:" + "cd" * 32, "anonymous")


class Harness:
    def __init__(self, tmp_path, **settings):
        self.server = server = fakeredis.FakeServer()
        self.sync = fakeredis.FakeRedis(server=server)
        self.store = Store(tmp_path / "cache")
        self.settings = Settings(redis_url="redis://fake", cache_dir=str(tmp_path / "cache"), **settings)
        self.queue = PreparationQueue(self.sync, self.settings.queue_name)
        self.looks = 0
        look = self.queue.look

        def counted(job_id):
            self.looks += 1
            return look(job_id)

        self.queue.look = counted
        self.preparer = QueuePreparer(self.settings, self.store, queue=self.queue,
                                      redis=fakeredis.FakeAsyncRedis(server=server))
        self.preparer.confirm_loss_after = CONFIRM

    def job(self) -> Job:
        return Job.fetch(SPEC.job_id, connection=self.sync)

    def started(self, seconds_ago: float = 0.0, beating: bool = True) -> None:
        job = self.job()
        job.started_at = datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)
        job.save()
        job.set_status(JobStatus.STARTED)
        if beating:
            self.sync.set(heartbeat_key(SPEC.job_id), "1")

    def report(self, outcome: dict) -> None:
        """The worker's last act."""
        self.sync.delete(heartbeat_key(SPEC.job_id))
        self.sync.set(outcome_key(SPEC.job_id), json.dumps(outcome))
        self.sync.publish(outcome_key(SPEC.job_id), json.dumps(outcome))

    def prepared(self) -> ImageRecord:
        """Put what a preparation would have stored for SPEC."""
        config = b'{"rootfs": {"diff_ids": []}}'
        self.store.put_blob(sha(config), config)
        layer = b"a layer"
        with self.store.atomic_writer(self.store.layer_path(sha(layer))) as out:
            out.write(layer)
        record = ImageRecord("https://reg.example", "team/app", SPEC.manifest_digest, sha(config),
                             (PreparedLayer(sha(layer), len(layer), "sha256:" + "0" * 64),))
        self.store.put_image(SPEC.key, record)
        return record

    async def ensure(self):
        return await self.preparer.ensure(SPEC, None, None)

    async def waiting(self) -> asyncio.Future:
        """A request that waits for SPEC's image (its job enqueued)."""
        waiter = asyncio.ensure_future(self.ensure())
        await asyncio.sleep(0.2)
        return waiter

    async def succeeds(self, waiter: asyncio.Future) -> None:
        """The job stores the image and reports success: the waiter gets the image."""
        record = self.prepared()
        self.report({"ok": True})
        assert await asyncio.wait_for(waiter, 5) == record

    async def fails(self, outcome: dict) -> PassthroughError:
        """A request waits; the job reports `outcome` (a failure): what the request gets."""
        waiter = await self.waiting()
        self.report(outcome)
        with pytest.raises(PassthroughError) as info:
            await asyncio.wait_for(waiter, 5)
        return info.value


@pytest.fixture
async def harness(tmp_path):
    harness = Harness(tmp_path, worker_lost_timeout=0.6, prepare_timeout=20)
    yield harness


def live_worker(harness: Harness, name: str = "w") -> None:
    """A worker beating its presence (an RQ registration alone does not count: a killed worker keeps it)."""
    Presence(harness.sync).beat(name, harness.settings.queue_name, ttl=60)


@pytest.mark.anyio
async def test_waiters_wake_on_the_outcome_and_get_the_image(harness):
    live_worker(harness)
    waiter = asyncio.ensure_future(harness.ensure())
    await asyncio.sleep(0.3)
    harness.started()
    record = harness.prepared()
    await asyncio.sleep(CHECK_EVERY + 0.1)  # a look in between: still running, keep waiting
    assert not waiter.done()
    woken = time.monotonic()
    harness.report({"ok": True})
    assert await asyncio.wait_for(waiter, 5) == record
    assert time.monotonic() - woken < CHECK_EVERY / 2, "woken by the publication, not by the next look"


@pytest.mark.anyio
async def test_a_failed_outcome_is_the_waiters_error(harness):
    live_worker(harness)
    error = await harness.fails({"ok": False, "error": "registry_forbidden", "status": 403, "message": "refused"})
    assert (error.status, error.code, error.message) == (403, "registry_forbidden", "refused")


@pytest.mark.anyio
async def test_no_worker_gives_up_after_worker_lost_timeout(harness):
    started = time.monotonic()
    with pytest.raises(PassthroughError) as info:
        await harness.ensure()
    assert (info.value.status, info.value.code) == (504, "no_worker")
    assert harness.settings.worker_lost_timeout <= time.monotonic() - started < harness.settings.worker_lost_timeout + 3


@pytest.mark.anyio
async def test_a_job_whose_worker_died_runs_again_while_its_waiters_wait(harness):
    live_worker(harness)
    waiter = await harness.waiting()
    first_run = harness.job().meta["run"]
    harness.started(seconds_ago=START_GRACE + 1, beating=False)  # its worker died: no beat, no outcome
    await asyncio.sleep(2 * CHECK_EVERY + CONFIRM)  # seen lost, then again after CONFIRM: run again
    assert not waiter.done(), "another worker is alive: the request keeps waiting for the rerun"
    rerun = harness.job()
    assert rerun.get_status() == JobStatus.QUEUED and rerun.meta["reruns"] == 1 and rerun.meta["run"] != first_run
    assert rerun.kwargs == SPEC.as_kwargs()
    assert (await harness.preparer.state(SPEC.job_id)).state == "queued", "not failed: an early stream goes on"
    harness.started()
    await harness.succeeds(waiter)


@pytest.mark.anyio
async def test_a_job_that_looks_lost_only_briefly_is_not_run_again(harness):
    """Redis back after an outage longer than WORKER_LOST_TIMEOUT: every heartbeat expired, and the live worker
    beats again within a second — its job must not be run twice."""
    live_worker(harness)
    waiter = await harness.waiting()
    first_run = harness.job().meta["run"]
    harness.started(seconds_ago=START_GRACE + 1, beating=False)
    await asyncio.sleep(CHECK_EVERY + 0.1)  # a look saw it lost
    harness.sync.set(heartbeat_key(SPEC.job_id), "1")  # its worker beats again
    await asyncio.sleep(2 * CHECK_EVERY)
    assert harness.job().meta["run"] == first_run and harness.job().get_status() == JobStatus.STARTED
    await harness.succeeds(waiter)


@pytest.mark.anyio
async def test_a_job_whose_only_worker_died_fails_as_worker_lost_and_stays_queued(harness):
    live_worker(harness)
    waiter = await harness.waiting()
    harness.sync.flushdb()  # only the job: the worker's presence expired with it
    await harness.preparer.start(SPEC, None, None)
    harness.started(seconds_ago=START_GRACE + 1, beating=False)
    with pytest.raises(PassthroughError) as info:
        await asyncio.wait_for(waiter, 5)
    assert (info.value.status, info.value.code) == (504, "worker_lost")
    assert harness.job().get_status() == JobStatus.QUEUED, "queued again, for a worker that starts later"
    # The next request joins the queued job and waits for a worker.
    live_worker(harness, "later")
    retry = asyncio.ensure_future(harness.ensure())
    await asyncio.sleep(0.3)
    assert not retry.done()
    harness.started()
    await harness.succeeds(retry)


@pytest.mark.anyio
async def test_a_killed_job_fails_and_a_vanished_job_is_queued_again(harness):
    live_worker(harness)
    await harness.preparer.start(SPEC, None, None)
    harness.started()
    waiter = asyncio.ensure_future(harness.preparer._wait(SPEC, None))
    await asyncio.sleep(0.2)
    harness.job().set_status(JobStatus.STOPPED)  # e.g. past JOB_TIMEOUT
    with pytest.raises(PassthroughError) as info:
        await asyncio.wait_for(waiter, 5)
    assert info.value.code == "job_killed" and "stopped" in info.value.message
    harness.job().delete()  # Redis lost it
    await asyncio.sleep(LOOK_SHARED_FOR + 0.1)  # the last look, shared for a while, saw it killed
    waiter = asyncio.ensure_future(harness.preparer._wait(SPEC, None))
    await asyncio.sleep(0.3)
    assert harness.job().get_status() == JobStatus.QUEUED and not waiter.done()
    harness.prepared()
    harness.report({"ok": True})
    await asyncio.wait_for(waiter, 5)


@pytest.mark.anyio
async def test_prepare_timeout_bounds_the_wait(tmp_path):
    harness = Harness(tmp_path, worker_lost_timeout=60, prepare_timeout=0.5)
    live_worker(harness)
    await harness.preparer.start(SPEC, None, None)
    harness.started()
    with pytest.raises(TimedOut, match="PREPARE_TIMEOUT"):
        await asyncio.wait_for(harness.ensure(), 5)
    await harness.preparer.close()


@pytest.mark.anyio
async def test_all_waiters_of_a_job_share_one_look_per_interval(harness):
    """A fleet on one image: 200 waiting requests and 200 early-start streams cost one look per interval."""
    live_worker(harness)
    await harness.preparer.start(SPEC, None, None)
    harness.started()
    waiters = [asyncio.ensure_future(harness.ensure()) for _ in range(200)]
    await asyncio.sleep(0.1)
    harness.looks = 0
    started = time.monotonic()
    while time.monotonic() - started < 2:  # and early-start streams look every POLL (0.25 s)
        states = await asyncio.gather(*(harness.preparer.state(SPEC.job_id) for _ in range(200)))
        assert {s.state for s in states} == {"running"}
        await asyncio.sleep(0.25)
    assert harness.looks <= (time.monotonic() - started) / LOOK_SHARED_FOR + 1, harness.looks
    harness.prepared()
    harness.report({"ok": True})
    await asyncio.wait_for(asyncio.gather(*waiters), 5)


@pytest.mark.anyio
async def test_a_retry_right_after_a_failure_waits_for_a_new_job(harness):
    """RQ keeps a failed job; the retry must replace it, and not take the look that saw it fail for its answer."""
    live_worker(harness)
    await harness.fails({"ok": False, "error": "invalid_content", "status": 502, "message": "bad digest"})
    harness.job().set_status(JobStatus.FAILED)  # what RQ does once the job function raised
    retry = asyncio.ensure_future(harness.ensure())
    await asyncio.sleep(0.3)
    assert not retry.done()
    assert harness.job().get_status() == JobStatus.QUEUED
    await harness.succeeds(retry)


@pytest.mark.anyio
async def test_redis_gone_for_longer_than_its_outage_timeout_is_503(harness):
    live_worker(harness)
    waiter = await harness.waiting()
    harness.server.connected = False  # every call fails, as past the client's retries
    with pytest.raises(Unavailable) as info:
        await asyncio.wait_for(waiter, 5)
    assert (info.value.status, info.value.code) == (503, "redis_unavailable")
    assert "REDIS_OUTAGE_TIMEOUT" in info.value.message
