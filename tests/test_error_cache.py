"""api.resolution: refusals and missing tags are remembered for a while, per identity, in bounded memory
(ErrorCache); lookups of one tag with one identity share the registry's answer while in flight (SharedLookups)."""

from __future__ import annotations

import asyncio
import types

import pytest

from docker_http_passthrough.api import resolution
from docker_http_passthrough.api.resolution import ErrorCache
from docker_http_passthrough.shared.errors import NotFound

KEY = ("https://reg.example", "team/app", "v1", "anonymous")


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(resolution, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    return now


def test_an_error_is_remembered_for_its_seconds_then_forgotten(clock):
    cache = ErrorCache(10)
    missing = NotFound("no such tag")
    cache.put(KEY, missing)
    clock[0] += 9.9
    assert cache.get(KEY) is missing
    assert cache.get(KEY[:3] + ("someone-else",)) is None  # per identity
    clock[0] += 0.2
    assert cache.get(KEY) is None
    assert KEY not in cache.entries


def test_zero_seconds_remembers_nothing(clock):
    cache = ErrorCache(0)
    cache.put(KEY, NotFound("x"))
    assert cache.get(KEY) is None and not cache.entries


def test_a_flood_of_distinct_names_does_not_grow_it_without_bound(clock):
    cache = ErrorCache(1)
    for i in range(25_000):
        cache.put(("r", f"repo{i}", "t", "a"), NotFound("x"))
        clock[0] += 0.001  # each expires a second later: most are stale by the time the bound is hit
    assert len(cache.entries) <= 10_001
    assert cache.get(("r", "repo24999", "t", "a")) is not None


@pytest.mark.anyio
async def test_lookups_in_flight_are_shared_and_a_leaver_cancels_nothing():
    lookups = resolution.SharedLookups()
    asked = []

    async def lookup(answer: str) -> str:
        asked.append(answer)
        await asyncio.sleep(0.1)
        return answer

    first = asyncio.ensure_future(lookups.run(KEY, lambda: lookup("sha256:aa")))
    await asyncio.sleep(0)
    leaver = asyncio.ensure_future(lookups.run(KEY, lambda: lookup("sha256:bb")))
    other = asyncio.ensure_future(lookups.run(KEY[:3] + ("someone-else",), lambda: lookup("sha256:cc")))
    await asyncio.sleep(0.01)
    leaver.cancel()  # its client hung up: the others still get the answer
    assert await first == "sha256:aa" and await other == "sha256:cc"
    assert asked == ["sha256:aa", "sha256:cc"] and lookups.flights == {}
    # Once landed, the next request asks again (one HEAD per request, shared only while in flight).
    assert await lookups.run(KEY, lambda: lookup("sha256:dd")) == "sha256:dd"


@pytest.mark.anyio
async def test_a_lookup_nobody_waits_for_any_more_is_cancelled_and_the_next_asks_afresh():
    lookups = resolution.SharedLookups()
    stopped = asyncio.Event()

    async def hanging() -> str:
        try:
            await asyncio.sleep(3600)  # a registry that drips
        finally:
            stopped.set()
        return "never"

    waiters = [asyncio.ensure_future(lookups.run(KEY, hanging)) for _ in range(2)]
    await asyncio.sleep(0.01)
    waiters[0].cancel()
    await asyncio.sleep(0.01)
    assert not stopped.is_set(), "one requester is still there"
    waiters[1].cancel()
    await asyncio.sleep(0)  # the last one has left; its lookup is being cancelled...
    # ...and a request arriving right now asks afresh instead of joining it (it would be cancelled with it).
    assert await lookups.run(KEY, lambda: asyncio.sleep(0, "sha256:ee")) == "sha256:ee"
    await asyncio.wait_for(stopped.wait(), 1)  # the upstream work nobody needs stopped


@pytest.mark.anyio
async def test_a_failed_lookup_fails_every_request_that_shared_it():
    lookups = resolution.SharedLookups()

    async def missing() -> str:
        await asyncio.sleep(0.05)
        raise NotFound("no such tag")

    results = await asyncio.gather(*(lookups.run(KEY, missing) for _ in range(3)), return_exceptions=True)
    assert [type(r) for r in results] == [NotFound] * 3
