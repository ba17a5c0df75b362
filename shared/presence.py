"""Which preparation workers are alive: each worker beats a key of its own in Redis every second, with a
lifetime of WORKER_LOST_TIMEOUT, and lists its name in one set.

A worker counts as running while it beat within the last SILENT_AFTER seconds (the key's remaining lifetime
tells, on Redis' clock), so a request for a cold image learns soon that nobody will prepare it. A worker whose
key expired is dead (SIGKILLed, out of memory, its host gone): its name is still in the set, so
a survivor can find it and clean up after it (see worker.maintenance). RQ's own worker keys cannot tell this:
a worker killed mid-job keeps its key for the job's whole timeout. Expiry is Redis' clock, so hosts' clocks
do not matter; a Redis outage shorter than WORKER_LOST_TIMEOUT kills no one (keys expire only while the server
runs, and a restarted server keeps their deadlines).
"""

from __future__ import annotations

import json
import os
import socket

import redis

from docker_http_passthrough.shared.jobs import WORKERS_KEY, presence_key

# A worker that has not beaten for this long (it beats every second) does not count as running.
SILENT_AFTER = 3.0


class Presence:
    def __init__(self, connection: redis.Redis):
        self.connection = connection

    def beat(self, name: str, queue: str, ttl: float) -> None:
        ttl_ms = max(int(ttl * 1000), 1)
        about = json.dumps({"queue": queue, "host": socket.gethostname(), "pid": os.getpid(), "ttl_ms": ttl_ms})
        pipe = self.connection.pipeline()
        pipe.set(presence_key(name), about, px=ttl_ms)
        pipe.sadd(WORKERS_KEY, name)  # every beat: a Redis that lost its data learns the name again
        pipe.execute()

    def leave(self, name: str) -> None:
        """A clean exit: nothing to clean up after."""
        pipe = self.connection.pipeline()
        pipe.delete(presence_key(name))
        pipe.srem(WORKERS_KEY, name)
        pipe.execute()

    def _known(self) -> dict[str, tuple[dict, float] | None]:
        """Every listed worker → (what its key says, seconds since it beat), or None when its key expired."""
        names = sorted(name.decode() for name in self.connection.smembers(WORKERS_KEY))
        pipe = self.connection.pipeline(transaction=False)
        for name in names:
            pipe.get(presence_key(name))
            pipe.pttl(presence_key(name))
        replies = pipe.execute() if names else []
        known: dict[str, tuple[dict, float] | None] = {}
        for name, value, left_ms in zip(names, replies[::2], replies[1::2]):
            if value is None or left_ms < 0:
                known[name] = None
                continue
            about = json.loads(value)
            known[name] = (about, max(about.get("ttl_ms", left_ms) - left_ms, 0) / 1000)
        return known

    def live_workers(self, queue: str, excluding: str | None = None) -> int:
        """Workers of `queue` that beat within SILENT_AFTER seconds."""
        return sum(1 for name, entry in self._known().items()
                   if entry and entry[0].get("queue") == queue and entry[1] <= SILENT_AFTER and name != excluding)

    def dead(self) -> list[str]:
        """Workers that stopped beating without leaving, for WORKER_LOST_TIMEOUT."""
        return [name for name, entry in self._known().items() if entry is None]

    def forget(self, name: str) -> None:
        """After cleaning up a dead worker."""
        self.connection.srem(WORKERS_KEY, name)
