"""shared.job_queue against the installed RQ and a real redis-server: starting, joining and replacing jobs, the
lost-job rule, live workers and queue depth — and a job queued under the function's pre-rename name running on
a current worker (an upgrade with jobs in the queue)."""

from __future__ import annotations

import importlib
import json
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from rq import Queue
from rq.job import Job, JobStatus

from docker_http_passthrough.shared.job_queue import START_GRACE, PreparationJob, PreparationQueue
from docker_http_passthrough.shared.jobs import JOB_FUNCTION, LEGACY_JOB_FUNCTIONS, JobSpec
from docker_http_passthrough.shared.jobs import credentials_key, heartbeat_key, outcome_key
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


@pytest.mark.parametrize("how", ["failed", "lost", "reported"])
def test_a_job_that_will_not_report_is_replaced(queue, how):
    start(queue, {"traceparent": "first"})
    job_id = SPEC.job_id
    old = Job.fetch(job_id, connection=queue.connection)
    if how == "failed":
        old.set_status(JobStatus.FAILED)
    elif how == "lost":
        mark_started(queue, job_id, seconds_ago=START_GRACE * 3)
    else:
        queue.connection.set(outcome_key(job_id), json.dumps({"ok": False, "error": "x", "status": 502,
                                                              "message": "x"}))
        old.set_status(JobStatus.FINISHED)
    assert start(queue, {"traceparent": "second"}) is None, "a fresh job, not a join"
    look = queue.look(job_id)
    assert look.status == JobStatus.QUEUED and look.outcome is None and look.trace == {"traceparent": "second"}
    assert queue.depth() == 1


def test_nothing_is_enqueued_for_a_prepared_image(queue):
    assert queue.start(SPEC, sealed=None, trace={}, job_timeout=600, prepared=lambda: True) is None
    assert queue.depth() == 0 and queue.look(SPEC.job_id).status is None


def test_live_workers_are_those_whose_registration_has_not_expired(queue):
    assert queue.live_workers() == 0
    worker = queue.worker("w1")
    worker.register_birth()
    assert queue.live_workers() == 1
    queue.connection.delete(worker.key)  # what its expiry does when it dies without a word
    assert queue.live_workers() == 0
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
