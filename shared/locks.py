"""Named locks so that two preparations needing the same layer at the same time download it once.

In-process (embedded mode) an asyncio lock per name is enough; across worker processes and hosts a Redis key
with an expiry, renewed while held, so a crashed holder frees the name within `ttl` seconds.
"""

from __future__ import annotations

import asyncio
import secrets
from contextlib import asynccontextmanager
from typing import AsyncIterator, Protocol

import redis.asyncio as aioredis


class Locks(Protocol):
    def hold(self, name: str) -> "AsyncContextManagerLike": ...


class AsyncContextManagerLike(Protocol):
    async def __aenter__(self) -> None: ...
    async def __aexit__(self, *exc: object) -> None: ...


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


# Delete the key only if we still own it (a holder that outlived its ttl must not free a successor's lock).
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"


class RedisLocks:
    def __init__(self, client: aioredis.Redis, prefix: str = "dhp:lock:", ttl: float = 10.0, poll: float = 0.25):
        self.client = client
        self.prefix = prefix
        self.ttl_ms = int(ttl * 1000)
        self.poll = poll

    async def _renew(self, key: str, token: str) -> None:
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            await self.client.eval(_RENEW, 1, key, token, self.ttl_ms)

    @asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        key = self.prefix + name
        token = secrets.token_hex(16)
        while not await self.client.set(key, token, nx=True, px=self.ttl_ms):
            await asyncio.sleep(self.poll)
        renewer = asyncio.create_task(self._renew(key, token))
        try:
            yield
        finally:
            renewer.cancel()
            await self.client.eval(_RELEASE, 1, key, token)
