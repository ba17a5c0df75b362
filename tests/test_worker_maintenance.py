"""worker.maintenance on fakeredis: a surviving worker buries a dead one — runs its lost job again, removes its
temp and lease files and its RQ registration — and never touches the files of a writer that is alive on
another host."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import fakeredis
import pytest
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

from docker_http_passthrough.shared import eviction
from docker_http_passthrough.shared.job_queue import START_GRACE, PreparationQueue
from docker_http_passthrough.shared.jobs import JobSpec, burial_key
from docker_http_passthrough.shared.owners import temp_name
from docker_http_passthrough.shared.settings import Settings
from docker_http_passthrough.shared.store import Store
from docker_http_passthrough.worker.maintenance import Maintenance
from tests.support.images import sha

SPEC = JobSpec({"api_url": "https://reg.example", "name": "reg.example", "token_url": None, "service": None,
                "basic_only": False}, "team/app", "sha256:" + "ef" * 32, "anonymous")
QUEUE = "q"
CONFIRM = 0.2  # LOSS_CONFIRMED_AFTER, shortened


@pytest.fixture
def fleet(tmp_path):
    connection = fakeredis.FakeRedis()
    queue = PreparationQueue(connection, QUEUE)
    store = Store(tmp_path / "cache", owner="survivor")
    survivor = queue.worker("survivor")
    maintenance = Maintenance(Settings(redis_url="redis://fake", worker_lost_timeout=60, queue_name=QUEUE),
                              queue, survivor, store)
    maintenance.confirm_loss_after = CONFIRM
    return connection, queue, store, maintenance


def steps(maintenance: Maintenance) -> None:
    """Two maintenance steps, CONFIRM apart: what it takes to act on a death."""
    maintenance.step()
    time.sleep(CONFIRM)
    maintenance.step()


def started_by(queue: PreparationQueue, worker_name: str) -> None:
    """What RQ records when a worker takes SPEC's job (without running the worker)."""
    queue.start(SPEC, sealed=None, trace={}, job_timeout=600, prepared=lambda: False)
    job = Job.fetch(SPEC.job_id, connection=queue.connection)
    job.worker_name = worker_name
    job.started_at = datetime.now(timezone.utc) - timedelta(seconds=START_GRACE * 3)
    job.save()
    job.set_status(JobStatus.STARTED)
    registry = StartedJobRegistry(queue=queue.queue)
    queue.connection.zadd(registry.key, {f"{SPEC.job_id}:execution": time.time() + 600})


def writer_files(store: Store, owner: str) -> list:
    """A half-written layer and a lease, as `owner` leaves them."""
    final = store.layer_path(sha(owner.encode()))
    temp = final.with_name(temp_name(final.name, owner))
    temp.write_bytes(b"half a layer")
    lease = eviction.Leases(Store(store.root, owner=owner), [sha(owner.encode())])
    lease.refresh(force=True)
    return [temp, *lease.paths]


def test_a_survivor_buries_a_dead_worker_and_spares_a_live_writers_files(fleet):
    connection, queue, store, maintenance = fleet
    dead = queue.worker("dead")
    dead.register_birth()
    queue.presence.beat("dead", QUEUE, ttl=0.2)
    queue.presence.beat("remote", QUEUE, ttl=60)  # alive, on another host
    started_by(queue, "dead")
    dead_files, live_files = writer_files(store, "dead"), writer_files(store, "remote")
    time.sleep(0.3)  # the dead worker's presence expires

    steps(maintenance)

    rerun = Job.fetch(SPEC.job_id, connection=connection)
    assert rerun.get_status() == JobStatus.QUEUED and rerun.meta["reruns"] == 1
    assert not any(path.exists() for path in dead_files)
    assert all(path.exists() for path in live_files), "a live writer's files are never touched"
    assert b"rq:worker:dead" not in connection.smembers("rq:workers")
    assert connection.hexists("rq:worker:dead", "death")
    assert queue.presence.dead() == [] and not connection.exists(burial_key("dead"))
    assert queue.live_workers() == 2, "the survivor beat, the remote one still beats"
    maintenance.step()
    assert Job.fetch(SPEC.job_id, connection=connection).meta["run"] == rerun.meta["run"], "once"


def test_a_dead_worker_whose_job_still_beats_is_buried_a_moment_later(fleet):
    connection, queue, store, maintenance = fleet
    queue.presence.beat("dead", QUEUE, ttl=0.2)
    started_by(queue, "dead")
    connection.set(f"dhp:heartbeat:{SPEC.job_id}", "1", px=800)  # beats a little longer than its presence
    time.sleep(0.3)
    steps(maintenance)
    assert queue.presence.dead() == ["dead"], "not buried while its job may still report"
    time.sleep(0.5)
    maintenance.step()
    assert queue.presence.dead() == [] and Job.fetch(SPEC.job_id, connection=connection).meta["reruns"] == 1


def test_after_a_long_redis_outage_a_worker_that_beats_again_is_not_buried(fleet):
    """Every presence expired while Redis was away; the live ones beat again within the confirmation time."""
    connection, queue, store, maintenance = fleet
    queue.presence.beat("other", QUEUE, ttl=60)
    files = writer_files(store, "other")
    connection.delete("dhp:alive:other")  # expired during the outage
    maintenance.step()
    assert queue.presence.dead() == ["other"]
    queue.presence.beat("other", QUEUE, ttl=60)  # back, beating
    time.sleep(CONFIRM)
    maintenance.step()
    assert queue.presence.dead() == [] and all(path.exists() for path in files)
    assert queue.live_workers() == 2
