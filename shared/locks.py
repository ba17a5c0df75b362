"""Named locks so that two preparations needing the same layer at the same time download it once.

Embedded mode: file locks (flock) in the store, which hold across the API processes of one server (`serve
--workers N`) as well as between the tasks of one; a process that dies frees its locks with its descriptors.
Across worker processes and hosts (two-tier), redis-py's Lock: a key with an expiry, renewed while held, so a
crashed holder frees the name within `ttl` seconds. A Redis blip is ridden out by the client's retries
(`redis_clients`); a renewal or release that still fails is not the holder's failure: the work under a lock is
verified anyway, the lock only saves a second download. (`LocalLocks`: one process's asyncio locks, for tests.)
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Protocol

import redis.asyncio as aioredis
from redis.asyncio.lock import Lock
from redis.exceptions import LockError, RedisError

log = logging.getLogger("docker_http_passthrough.locks")


class Locks(Protocol):
    def hold(self, name: str) -> AbstractAsyncContextManager[None]: ...


class LocalLocks:
    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    @asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(name, asyncio.Lock())
        self._users[name] = self._users.get(name, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._users[name] -= 1
            if not self._users[name]:
                del self._users[name], self._locks[name]


class FileLocks:
    """flock on `<directory>/<name>.lock`: exclusive between open descriptions, so between processes and between
    tasks of one process alike. Lock files stay (an unlinked lock file could be locked twice: once through the
    old inode, once through a new one); they are empty unless their holder writes into them (`hold` yields the
    descriptor)."""

    def __init__(self, directory: Path | str, poll: float = 0.1):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.poll = poll

    def path(self, name: str) -> Path:
        return self.directory / f"{name.replace('/', '_')}.lock"

    @asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[int]:
        fd = os.open(self.path(name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(self.poll)
            yield fd
        finally:
            os.close(fd)  # releases the lock

    def held(self, name: str) -> bool:
        """Whether someone holds `name` now."""
        try:
            fd = os.open(self.path(name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)


class RedisLocks:
    def __init__(self, client: aioredis.Redis, prefix: str = "dhp:lock:", ttl: float = 10.0, poll: float = 0.25):
        self.client = client
        self.prefix = prefix
        self.ttl = ttl
        self.poll = poll

    async def _renew(self, lock: Lock) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await lock.reacquire()  # back to a full ttl
            except LockError:  # expired meanwhile (a stalled process): someone else may hold it now
                log.warning("lock %s expired while held", lock.name)
                return
            except RedisError as exc:  # Redis away for longer than the client's retries: try again next time
                log.warning("lock %s not renewed: %s", lock.name, type(exc).__name__)

    @asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        # Not thread-local: the token belongs to this holder's tasks, which its renewer task is one of.
        lock = self.client.lock(self.prefix + name, timeout=self.ttl, sleep=self.poll, thread_local=False)
        await lock.acquire()
        renewer = asyncio.create_task(self._renew(lock))
        try:
            yield
        finally:
            renewer.cancel()
            try:
                await lock.release()
            except RedisError as exc:  # expired while held, or Redis away: its ttl frees it anyway
                log.warning("lock %s not released: %s", lock.name, type(exc).__name__)
