"""Which preparation workers are alive: each worker beats a key of its own in Redis every second, with a
lifetime of WORKER_LOST_TIMEOUT, and lists its name in one set.

A worker whose key expired is dead (SIGKILLed, out of memory, its host gone): its name is still in the set, so
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


class Presence:
    def __init__(self, connection: redis.Redis):
        self.connection = connection

    def beat(self, name: str, queue: str, ttl: float) -> None:
        about = json.dumps({"queue": queue, "host": socket.gethostname(), "pid": os.getpid()})
        pipe = self.connection.pipeline()
        pipe.set(presence_key(name), about, px=max(int(ttl * 1000), 1))
        pipe.sadd(WORKERS_KEY, name)  # every beat: a Redis that lost its data learns the name again
        pipe.execute()

    def leave(self, name: str) -> None:
        """A clean exit: nothing to clean up after."""
        pipe = self.connection.pipeline()
        pipe.delete(presence_key(name))
        pipe.srem(WORKERS_KEY, name)
        pipe.execute()

    def _known(self) -> dict[str, dict | None]:
        """Every listed worker → what its key says, or None when it expired."""
        names = sorted(name.decode() for name in self.connection.smembers(WORKERS_KEY))
        if not names:
            return {}
        values = self.connection.mget([presence_key(name) for name in names])
        return {name: (json.loads(value) if value else None) for name, value in zip(names, values)}

    def live_workers(self, queue: str, excluding: str | None = None) -> int:
        return sum(1 for name, about in self._known().items()
                   if about and about.get("queue") == queue and name != excluding)

    def dead(self) -> list[str]:
        """Workers that stopped beating without leaving."""
        return [name for name, about in self._known().items() if about is None]

    def forget(self, name: str) -> None:
        """After cleaning up a dead worker."""
        self.connection.srem(WORKERS_KEY, name)
