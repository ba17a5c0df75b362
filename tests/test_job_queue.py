"""shared.job_queue against the installed RQ and a real redis-server: starting, joining and replacing jobs, the
lost-job rule and running a lost job again, live workers (by heartbeat), burying a dead worker's registration,
queue depth — and a job queued under the function's pre-rename name running on a current worker (an upgrade
with jobs in the queue)."""

from __future__ import annotations

import importlib
import json
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from rq import Queue
from rq.job import Job, JobStatus

from docker_http_passthrough.shared.job_queue import MAX_RERUNS, START_GRACE, PreparationJob, PreparationQueue
from docker_http_passthrough.shared.jobs import JOB_FUNCTION, LEGACY_JOB_FUNCTIONS, JobSpec
from docker_http_passthrough.shared.jobs import credentials_key, heartbeat_key, outcome_key, progress_key
from docker_http_passthrough.shared.presence import SILENT_AFTER
from docker_http_passthrough.shared.store import Store
from docker_http_passthrough.worker import jobs as worker_jobs
from tests.support.images import make_layer

REPO_ROOT = Path(__file__).resolve().parents[1]
QUEUE = "dhp-test"
SPEC = JobSpec({"api_url": "https://reg.example", "name": "reg.example", "token_url": None, "service": None,
                "basic_only": False}, "team/app", "sha256:" + "ab" * 32, "anonymous")


@pytest.fixture
def queue(redis_server):
    prepared = PreparationQueue(redis_server.client(), QUEUE)
    yield prepared
    prepared.close()


def start(queue: PreparationQueue, trace: dict, spec: JobSpec = SPEC, sealed: bytes | None = None):
    return queue.start(spec, sealed=sealed, trace=trace, job_timeout=600, prepared=lambda: False)


def mark_started(queue: PreparationQueue, job_id: str, seconds_ago: float) -> None:
    """What a worker does when it takes a job (without the worker)."""
    job = Job.fetch(job_id, connection=queue.connection)
    job.started_at = datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)
    job.save()
    job.set_status(JobStatus.STARTED)


def test_start_enqueues_once_and_later_callers_join(queue):
    assert start(queue, {"traceparent": "first"}) is None
    assert start(queue, {"traceparent": "second"}) == {"traceparent": "first"}, "joins, with the starter's trace"
    assert queue.depth() == 1
    job = Job.fetch(SPEC.job_id, connection=queue.connection)
    assert job.func_name == JOB_FUNCTION and job.kwargs == SPEC.as_kwargs()
    look = queue.look(SPEC.job_id)
    assert (look.status, look.running_or_waiting, look.lost) == (JobStatus.QUEUED, True, False)


def test_client_credentials_wait_sealed_beside_the_job(queue):
    start(queue, {}, JobSpec(**{**SPEC.as_kwargs(), "credential_source": "client"}), sealed=b"sealed bytes")
    assert queue.connection.get(credentials_key(SPEC.job_id)) == b"sealed bytes"
    assert 600 < queue.connection.ttl(credentials_key(SPEC.job_id)) <= 600 + 600


def test_lost_rule(queue):
    start(queue, {})
    job_id = SPEC.job_id
    mark_started(queue, job_id, seconds_ago=START_GRACE / 3)
    assert not queue.look(job_id).lost, "just started: its first heartbeat may not be there yet"
    mark_started(queue, job_id, seconds_ago=START_GRACE * 3)
    look = queue.look(job_id)
    assert look.status == JobStatus.STARTED and look.lost and not look.running_or_waiting
    queue.connection.set(heartbeat_key(job_id), "1")
    assert not queue.look(job_id).lost, "beating"
    queue.connection.delete(heartbeat_key(job_id))
    queue.connection.set(outcome_key(job_id), json.dumps({"ok": True}))
    look = queue.look(job_id)
    assert not look.lost and look.outcome == {"ok": True}, "it reported: done, not lost"


@pytest.mark.parametrize("how", ["failed", "reported"])
def test_a_job_that_will_not_report_is_replaced(queue, how):
    start(queue, {"traceparent": "first"})
    job_id = SPEC.job_id
    old = Job.fetch(job_id, connection=queue.connection)
    if how == "failed":
        old.set_status(JobStatus.FAILED)
    else:
        queue.connection.set(outcome_key(job_id), json.dumps({"ok": False, "error": "x", "status": 502,
                                                              "message": "x"}))
        old.set_status(JobStatus.FINISHED)
    assert start(queue, {"traceparent": "second"}) is None, "a fresh job, not a join"
    look = queue.look(job_id)
    assert look.status == JobStatus.QUEUED and look.outcome is None and look.trace == {"traceparent": "second"}
    assert queue.depth() == 1


def test_a_lost_job_is_joined_until_its_loss_is_confirmed(queue):
    """After a Redis outage every heartbeat has expired: a new request must not replace a job whose worker is
    about to beat again; rerun_if_lost (after LOSS_CONFIRMED_AFTER) is the one way a lost job runs again."""
    start(queue, {"traceparent": "first"})
    mark_started(queue, SPEC.job_id, seconds_ago=START_GRACE * 3)
    assert queue.look(SPEC.job_id).lost
    assert start(queue, {"traceparent": "second"}) == {"traceparent": "first"}
    assert queue.look(SPEC.job_id).status == JobStatus.STARTED and queue.depth() == 1, "nothing more enqueued"


def test_nothing_is_enqueued_for_a_prepared_image(queue):
    assert queue.start(SPEC, sealed=None, trace={}, job_timeout=600, prepared=lambda: True) is None
    assert queue.depth() == 0 and queue.look(SPEC.job_id).status is None


def test_a_lost_job_runs_again_once_with_its_arguments_trace_and_credentials(queue):
    client_spec = JobSpec(**{**SPEC.as_kwargs(), "credential_source": "client"})
    start(queue, {"traceparent": "first"}, client_spec, sealed=b"sealed bytes")
    job_id = SPEC.job_id
    first = Job.fetch(job_id, connection=queue.connection)
    mark_started(queue, job_id, seconds_ago=START_GRACE * 3)
    queue.connection.hset(progress_key(job_id), "layers_done", 1)

    look = queue.rerun_if_lost(job_id)
    rerun = Job.fetch(job_id, connection=queue.connection)
    assert look.status == JobStatus.QUEUED and look.running_or_waiting and look.trace == {"traceparent": "first"}
    assert rerun.kwargs == client_spec.as_kwargs() and rerun.timeout == first.timeout
    assert rerun.meta["reruns"] == 1 and rerun.meta["run"] != first.meta["run"]
    assert queue.connection.get(credentials_key(job_id)) == b"sealed bytes", "the rerun needs them"
    assert not queue.connection.exists(progress_key(job_id))
    assert queue.depth() == 1
    # Anyone else who noticed the loss finds the rerun: nothing more is enqueued.
    assert queue.rerun_if_lost(job_id).status == JobStatus.QUEUED
    assert Job.fetch(job_id, connection=queue.connection).meta["run"] == rerun.meta["run"] and queue.depth() == 1


def test_a_job_that_keeps_losing_its_workers_fails_for_good(queue):
    start(queue, {})
    job_id = SPEC.job_id
    for _ in range(MAX_RERUNS):
        mark_started(queue, job_id, seconds_ago=START_GRACE * 3)
        queue.rerun_if_lost(job_id)
    mark_started(queue, job_id, seconds_ago=START_GRACE * 3)
    look = queue.rerun_if_lost(job_id)
    assert look.status is None and look.outcome["error"] == "worker_lost" and look.outcome["status"] == 504
    assert f"{MAX_RERUNS + 1} times" in look.outcome["message"] and queue.depth() == 0
    assert start(queue, {}) is None and queue.look(job_id).status == JobStatus.QUEUED, "a new request starts over"


def test_live_workers_are_those_whose_heartbeat_is_recent(queue):
    assert queue.live_workers() == 0
    killed = queue.worker("killed")
    killed.register_birth()  # RQ keeps this for the job's whole timeout after a SIGKILL: it must not count
    queue.presence.beat("killed", QUEUE, ttl=0.3)
    queue.presence.beat("alive", QUEUE, ttl=60)
    queue.presence.beat("other-queue", "another", ttl=60)
    assert queue.live_workers() == 2
    time.sleep(0.4)
    assert queue.live_workers() == 1 and queue.presence.dead() == ["killed"]

    # Silent for longer than SILENT_AFTER (it beats every second): not running, though not yet given up for dead.
    queue.presence.beat("stalled", QUEUE, ttl=60)
    queue.connection.pexpire("dhp:alive:stalled", int((60 - SILENT_AFTER - 1) * 1000))
    assert queue.live_workers() == 1 and queue.presence.dead() == ["killed"]

    queue.bury("killed")
    queue.presence.leave("stalled")
    assert queue.presence.dead() == []
    assert killed.key.encode() not in queue.connection.smembers("rq:workers")
    assert queue.connection.hexists(killed.key, "death") and queue.connection.ttl(killed.key) <= 60
    queue.presence.leave("alive")
    assert queue.live_workers() == 0


def test_a_worker_that_redis_forgot_registers_again(queue):
    worker = queue.worker("w1")
    assert not queue.stay_registered(worker), "not before the worker registered itself"
    worker.register_birth()
    assert not queue.stay_registered(worker)
    queue.connection.flushdb()  # a restart without persistence
    assert queue.stay_registered(worker)
    assert worker.key.encode() in queue.connection.smembers("rq:workers")
    worker.register_death()


def test_a_job_queued_under_the_old_function_name_runs_on_a_current_worker(queue, redis_server, registry,
                                                                           unique_repo, tmp_path, monkeypatch):
    """Upgrade: an API of the old layout enqueued "worker.jobs.prepare"; the new worker runs it as ours."""
    # As installed: no top-level `worker` package (here the repository root on sys.path would provide one).
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p and Path(p).resolve() != REPO_ROOT])
    monkeypatch.delitem(sys.modules, "worker", raising=False)
    with pytest.raises(ImportError):
        importlib.import_module(LEGACY_JOB_FUNCTIONS[0].rpartition(".")[0])
    image = registry.push_image(unique_repo, "v1", [make_layer({"a.txt": b"queued before the upgrade"})])
    spec = JobSpec({"api_url": registry.url, "name": registry.host, "token_url": None, "service": None,
                    "basic_only": False}, unique_repo, image.manifest_digest, "anonymous")
    Queue(QUEUE, connection=queue.connection).enqueue(LEGACY_JOB_FUNCTIONS[0], kwargs=spec.as_kwargs(),
                                                      job_id=spec.job_id)
    assert PreparationJob.fetch(spec.job_id, connection=queue.connection).func is worker_jobs.prepare
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    monkeypatch.setenv("CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("QUEUE_NAME", QUEUE)

    queue.worker().work(burst=True, with_scheduler=False)

    look = queue.look(spec.job_id)
    assert look.status == JobStatus.FINISHED and look.outcome == {"ok": True}
    assert Store(tmp_path / "cache").get_image(spec.key) is not None
