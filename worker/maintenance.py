"""What a worker does beside its jobs, on a thread of its own, every second:

- beat its presence (`shared.presence`), so the API counts it as alive and nobody buries it;
- put itself back into RQ's worker registry when Redis lost it (a restart without persistence);
- bury the workers that died without leaving (SIGKILL, out of memory, a lost host), at once rather than at RQ's
  next maintenance (minutes later) or their own restart: run their lost jobs again (`rerun_if_lost`), remove
  their temp and lease files — found by the owner token in their names, so a live writer's files are never
  touched — and their RQ registration. One survivor buries each dead worker (a short Redis lock), and only
  once it has seen it dead for LOSS_CONFIRMED_AFTER seconds while itself reaching Redis: after an outage longer
  than WORKER_LOST_TIMEOUT every presence has expired, and the live ones beat again within a second or two.
"""

from __future__ import annotations

import logging
import threading
import time

from rq import SimpleWorker

from docker_http_passthrough.shared.eviction import remove_leases_of
from docker_http_passthrough.shared.growing_layer import remove_records_of
from docker_http_passthrough.shared.job_queue import LOSS_CONFIRMED_AFTER, PreparationQueue
from docker_http_passthrough.shared.jobs import burial_key
from docker_http_passthrough.shared.settings import Settings
from docker_http_passthrough.shared.store import Store

log = logging.getLogger("docker_http_passthrough.worker")

BEAT_EVERY = 1.0
# A burial that has not finished by then (its survivor died too) may be taken over.
BURIAL_TIMEOUT = 60


class Maintenance:
    def __init__(self, settings: Settings, queue: PreparationQueue, worker: SimpleWorker, store: Store):
        self.settings = settings
        self.queue = queue
        self.worker = worker
        self.store = store
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="dhp-maintenance", daemon=True)
        self.confirm_loss_after = LOSS_CONFIRMED_AFTER
        self.connected_since = time.monotonic()  # beating without a failure since
        self.suspects: dict[str, float] = {}  # worker name → since when it has looked dead

    def start(self) -> None:
        self.step()  # present before the first job can be taken
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        try:
            self.queue.presence.leave(self.worker.name)
        except Exception:  # Redis away at exit: the key expires by itself, and a survivor buries us
            log.warning("could not leave the worker set", exc_info=True)

    def _run(self) -> None:
        while not self.stopping.wait(BEAT_EVERY):
            try:
                self.step()
            except Exception:  # a Redis outage: keep trying; the job's own retries bound its wait
                self.connected_since, self.suspects = time.monotonic(), {}
                log.warning("worker maintenance failed; trying again", exc_info=True)

    def step(self) -> None:
        self.queue.presence.beat(self.worker.name, self.queue.queue.name, self.settings.worker_lost_timeout)
        if self.queue.stay_registered(self.worker):
            log.warning("worker %s was missing from RQ's registry (Redis lost it?): registered again",
                        self.worker.name)
        now = time.monotonic()
        dead = [name for name in self.queue.presence.dead() if name != self.worker.name]
        self.suspects = {name: self.suspects.get(name, now) for name in dead}
        for name, since in self.suspects.items():
            if now - max(since, self.connected_since) >= self.confirm_loss_after:
                self.bury(name)

    def bury(self, name: str) -> None:
        connection = self.queue.connection
        if not connection.set(burial_key(name), self.worker.name, nx=True, ex=BURIAL_TIMEOUT):
            return  # another survivor is at it
        try:
            looks = [self.queue.rerun_if_lost(job_id) for job_id in self.queue.jobs_of(name)]
            if any(look.heartbeat for look in looks):
                return  # its job still beats (its presence key expired first): look again next time
            files = (self.store.remove_abandoned(name) + remove_leases_of(self.store, name)
                     + remove_records_of(self.store, name))
            self.queue.bury(name)
            log.warning("worker %s died: removed its registration and %d temp, lease and progress files", name, files)
        finally:
            connection.delete(burial_key(name))
