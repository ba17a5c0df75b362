"""The preparation queue on RQ, through RQ's public API only (`Job`, `Queue`, `Worker` and their key helpers).

Everything the API and the worker do with RQ goes through here: start a job unless one runs, look at a job,
run a lost job again, count live workers and waiting jobs, build the worker, tell whether one is healthy, and
bury a dead one. The rule for a lost job is written once, in `JobLook`. The calls are synchronous (RQ is); the
API runs them on a few threads of its own.

A lost job (its worker died mid-job) is run again at once on a live worker — by whichever notices first, a
waiting request or a surviving worker's maintenance; the enqueue lock makes that happen once. The rerun reuses
every layer already verified and stored. A job that keeps losing its workers (it makes them run out of memory,
say) fails after MAX_RERUNS reruns instead of killing the fleet one worker at a time.
"""

from __future__ import annotations

import importlib
import json
import logging
import secrets
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import redis
from rq import Queue, SimpleWorker, Worker, get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.worker_registration import clean_worker_registry

from docker_http_passthrough.shared.jobs import (
    JOB_FUNCTION,
    LEGACY_JOB_FUNCTIONS,
    JobSpec,
    credentials_key,
    enqueue_lock_key,
    heartbeat_key,
    outcome_key,
    progress_key,
)
from docker_http_passthrough.shared.owners import process_token
from docker_http_passthrough.shared.presence import Presence

log = logging.getLogger("docker_http_passthrough.jobs")

ACTIVE = frozenset({JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED,
                    JobStatus.CREATED})
# Ended without running to its end: killed (job timeout), or its worker died and RQ noticed.
KILLED = frozenset({JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED})
# A job that started this recently may not have written its first heartbeat yet.
START_GRACE = 3.0
# RQ keeps finished and failed job ids this long; we replace such jobs anyway when asked again.
RESULT_TTL = 600
# After a job reported its outcome, how long RQ may take to mark it finished.
SETTLE_TIMEOUT = 5.0
# An idle worker re-registers with RQ every WORKER_TTL - 15 s (RQ's dequeue timeout); a busy one does not (the
# job runs in its thread), but the job beats every second under heartbeat_key. `worker_health` relies on both.
WORKER_TTL = 60
# A job lost with its worker runs again this many times at most.
MAX_RERUNS = 2
# A loss is acted on only once its observer has seen it for this long while reaching Redis: after an outage
# longer than WORKER_LOST_TIMEOUT every heartbeat has expired, and live workers need a moment to beat again.
LOSS_CONFIRMED_AFTER = 3.0


class PreparationJob(Job):
    """RQ's Job, except that a job queued under a legacy name of the job function (before the package was
    renamed, see jobs.LEGACY_JOB_FUNCTIONS) runs the current one: an upgrade loses no queued job."""

    @property
    def func(self):
        if self.func_name in LEGACY_JOB_FUNCTIONS:
            module, _, name = JOB_FUNCTION.rpartition(".")
            return getattr(importlib.import_module(module), name)
        return super().func


@dataclass(frozen=True)
class JobLook:
    """One look at a preparation job, read in an order that cannot mistake a job that just ended for a lost one."""

    status: str | None  # RQ's status; None when no such job exists
    started_at: float | None = None  # epoch seconds
    outcome: dict | None = None  # what the job reported ({"ok": …}); None while it has not
    heartbeat: bool = False  # its worker beat within WORKER_LOST_TIMEOUT
    trace: dict = field(default_factory=dict)  # trace context of the request that started it
    worker: str | None = None  # the RQ worker that took it
    looked_at: float = field(default_factory=time.time)

    @property
    def lost(self) -> bool:
        """Started, but neither beating nor reporting: its worker died and RQ has not noticed yet."""
        return (self.status == JobStatus.STARTED and not self.heartbeat and self.outcome is None
                and self.looked_at - (self.started_at or 0.0) > START_GRACE)

    @property
    def running_or_waiting(self) -> bool:
        """Will still report an outcome by itself (as far as anyone can tell)."""
        return self.outcome is None and self.status in ACTIVE and not self.lost


def current_job() -> Job:
    """The job this worker is running (inside a job function)."""
    return get_current_job()


def _epoch(moment: datetime | None) -> float | None:
    if moment is None:
        return None
    # RQ stores UTC and may hand it back without a zone: never read it as local time.
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def current_run(job: Job) -> str | None:
    """Which run of its job id this is: a worker that lost its job to a rerun must not report for the rerun."""
    return job.meta.get("run")


def still_current(job: Job, run: str | None) -> bool:
    """Is `run` still the run of this job id in Redis (or is there no job to tell)?"""
    try:
        return job.get_meta(refresh=True).get("run", run) == run
    except redis.RedisError:
        return True


class PreparationQueue:
    def __init__(self, connection: redis.Redis, name: str):
        self.connection = connection
        self.queue = Queue(name, connection=connection, job_class=PreparationJob)
        self.presence = Presence(connection)

    def _outcome(self, job_id: str) -> dict | None:
        raw = self.connection.get(outcome_key(job_id))
        return None if raw is None else json.loads(raw)

    def _fetch(self, job_id: str) -> PreparationJob | None:
        try:
            return PreparationJob.fetch(job_id, connection=self.connection)
        except NoSuchJobError:
            return None

    def look(self, job_id: str) -> JobLook:
        outcome = self._outcome(job_id)
        job = self._fetch(job_id)
        if job is None:
            return JobLook(None, outcome=outcome)
        status = JobStatus(job.get_status(refresh=False)).value
        heartbeat = status == JobStatus.STARTED and bool(self.connection.exists(heartbeat_key(job_id)))
        if status == JobStatus.STARTED and not heartbeat and outcome is None:
            # The job's last act sets its outcome and drops its heartbeat in one transaction: the outcome read
            # before the heartbeat may predate it, so read it again before calling the job lost.
            outcome = self._outcome(job_id)
        return JobLook(status, _epoch(job.started_at), outcome, heartbeat, job.meta.get("trace") or {},
                       worker=job.worker_name)

    def start(self, spec: JobSpec, *, sealed: bytes | None, trace: dict, job_timeout: int,
              prepared: Callable[[], bool]) -> dict | None:
        """Make sure a job prepares `spec`, unless `prepared()`: enqueue one, or join the one that runs.

        Returns the trace context of the request that started the running job when this call joins it. A short
        Redis lock makes check-then-enqueue atomic across API processes."""
        job_id = spec.job_id
        with self._enqueue_lock(job_id):
            if prepared():
                return None
            look = self.look(job_id)
            if look.running_or_waiting or look.lost:
                # A lost job is joined too: it runs again once the loss is confirmed (rerun_if_lost).
                return look.trace
            if look.status is not None:
                # Failed, finished without output, or lost: RQ keeps such ids for a long time; replace it.
                self._replace(job_id, reported=look.outcome is not None)
            self._enqueue(spec, sealed, trace, job_timeout)
            return None

    def _enqueue_lock(self, job_id: str):
        return self.connection.lock(enqueue_lock_key(job_id), timeout=30, blocking_timeout=30)

    def rerun_if_lost(self, job_id: str) -> JobLook:
        """Run a lost job again, with the same arguments, trace context and sealed credentials; the look after.
        Only a job that is still lost is replaced, so any number of callers may ask at once. Callers confirm
        the loss first (LOSS_CONFIRMED_AFTER)."""
        with self._enqueue_lock(job_id):
            look = self.look(job_id)
            job = self._fetch(job_id) if look.lost else None
            if job is None:
                return look
            reruns = int(job.meta.get("reruns", 0))
            if reruns >= MAX_RERUNS:
                self._give_up(job, reruns)
            else:
                log.warning("job %s lost its worker %s: running it again (rerun %d)", job_id, job.worker_name,
                            reruns + 1)
                spec = JobSpec(**job.kwargs)
                trace, timeout = job.meta.get("trace") or {}, job.timeout
                job.delete()
                self.connection.expire(credentials_key(job_id), timeout + RESULT_TTL)  # sealed, if any: kept
                self._enqueue(spec, None, trace, timeout, reruns=reruns + 1)
            return self.look(job_id)

    def _give_up(self, job: Job, reruns: int) -> None:
        outcome = json.dumps({"ok": False, "error": "worker_lost", "status": 504, "message": (
            f"the preparation was lost with its worker {reruns + 1} times (killed, out of memory?); see the "
            "worker logs")})
        log.error("job %s lost its worker %d times: giving up", job.id, reruns + 1)
        job.delete()
        pipe = self.connection.pipeline()
        pipe.delete(credentials_key(job.id), heartbeat_key(job.id), progress_key(job.id))
        pipe.set(outcome_key(job.id), outcome, ex=RESULT_TTL)
        pipe.publish(outcome_key(job.id), outcome)
        pipe.execute()

    def _replace(self, job_id: str, reported: bool) -> None:
        job = self._fetch(job_id)
        if job is None:
            return
        if reported:
            # It reported, but RQ may not have marked it finished yet: replacing it now would let the old
            # worker's bookkeeping overwrite the new job. Give RQ a moment.
            deadline = time.monotonic() + SETTLE_TIMEOUT
            while job.get_status(refresh=True) in ACTIVE and time.monotonic() < deadline:
                time.sleep(0.05)
        job.delete()

    def _enqueue(self, spec: JobSpec, sealed: bytes | None, trace: dict, job_timeout: int, reruns: int = 0) -> None:
        job_id = spec.job_id
        pipe = self.connection.pipeline()
        pipe.delete(outcome_key(job_id), heartbeat_key(job_id), progress_key(job_id))
        if sealed is not None:
            pipe.set(credentials_key(job_id), sealed, ex=job_timeout + RESULT_TTL)
        pipe.execute()
        self.queue.enqueue(
            JOB_FUNCTION,
            kwargs=spec.as_kwargs(),
            job_id=job_id,
            job_timeout=job_timeout,
            result_ttl=RESULT_TTL,
            failure_ttl=RESULT_TTL,
            description=f"prepare {spec.registry.name}/{spec.repository}@{spec.manifest_digest}",
            meta={"trace": trace, "run": secrets.token_hex(8), "reruns": reruns},
        )

    def progress(self, job_id: str) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.connection.hgetall(progress_key(job_id)).items()}

    def live_workers(self, excluding: str | None = None) -> int:
        """Workers of this queue whose heartbeat is recent (RQ's registrations outlive a killed worker)."""
        return self.presence.live_workers(self.queue.name, excluding)

    def depth(self) -> int:
        """Jobs waiting for a worker."""
        return self.queue.count

    def worker(self, name: str | None = None) -> SimpleWorker:
        # Jobs run in the worker process itself (no fork per job): they are asyncio I/O with bounded buffers,
        # so nothing needs a fresh process, and metrics and tracing stay in one registry and one provider. A
        # job past JOB_TIMEOUT is still stopped (SIGALRM), and a dead worker is noticed by its missing heartbeat.
        # SIGTERM is RQ's warm shutdown: the running job finishes, then the worker exits; a second SIGTERM stops
        # the job at once (it reports worker_stopped). Give a worker a stop grace period of JOB_TIMEOUT.
        # Named by the process token, which its temp and lease files carry too (see shared.owners).
        return SimpleWorker([self.queue], connection=self.connection, name=name or process_token(),
                            job_class=PreparationJob, worker_ttl=WORKER_TTL)

    def worker_health(self, name: str | None, max_age: float) -> tuple[bool, str]:
        """(alive, what was found) for the worker called ``name``, or else any worker registered from this host
        name (container, pod): registered, not stopped, and either an RQ heartbeat within ``max_age`` seconds
        or busy with a job that is beating."""
        if name is not None:
            found = Worker.find_by_key(Worker.redis_worker_namespace_prefix + name, connection=self.connection)
            workers = [found] if found is not None else []
        else:
            host = socket.gethostname()
            workers = [w for w in Worker.all(connection=self.connection, queue=self.queue) if w.hostname == host]
        if not workers:
            who = f"named {name}" if name else f"on host {socket.gethostname()}"
            return False, f"no worker {who} is registered for queue {self.queue.name}"
        reasons = []
        for worker in workers:
            reason = self._why_not_alive(worker, max_age)
            if reason is None:
                return True, f"worker {worker.name} is registered and alive ({worker.get_state()})"
            reasons.append(reason)
        return False, "; ".join(reasons)

    def _why_not_alive(self, worker: Worker, max_age: float) -> str | None:
        if worker.death_date is not None:  # stopped: RQ keeps its record for a minute
            return f"no worker: {worker.name} stopped at {worker.death_date:%H:%M:%S} UTC"
        if worker.last_heartbeat is None:
            return f"worker {worker.name} has never sent a heartbeat"
        age = (datetime.now(timezone.utc) - worker.last_heartbeat).total_seconds()
        if age <= max_age:
            return None
        job_id = worker.get_current_job_id()
        if job_id and self.connection.exists(heartbeat_key(job_id)):
            return None  # busy with a job that is beating
        return f"worker {worker.name}: last heartbeat {age:.0f}s ago (more than {max_age:g}s) and no job beating"

    def jobs_of(self, worker_name: str) -> list[str]:
        """The jobs RQ records as started by this worker."""
        registry = StartedJobRegistry(queue=self.queue, job_class=PreparationJob)
        ids = []
        for job_id in registry.get_job_ids(cleanup=False):  # RQ's own cleanup stays in its maintenance
            job = self._fetch(job_id)
            if job is not None and job.worker_name == worker_name:
                ids.append(job_id)
        return ids

    def stay_registered(self, worker: SimpleWorker) -> bool:
        """Put a live worker back into RQ's registry when Redis lost it (a restart without persistence, an
        expired key); True when it had to. Not before the worker registered itself (work() does that)."""
        if worker.birth_date is None or self.connection.exists(worker.key):
            return False
        worker.register_birth()
        return True

    def bury(self, worker_name: str) -> None:
        """RQ's side of cleaning up after a dead worker: its registration and its place in the worker sets."""
        worker = SimpleWorker.find_by_key(SimpleWorker.redis_worker_namespace_prefix + worker_name,
                                          connection=self.connection, job_class=PreparationJob)
        if worker is not None:
            worker.register_death()
        clean_worker_registry(self.queue)
        self.presence.forget(worker_name)

    def close(self) -> None:
        self.connection.close()
