"""shared.locks: one holder per name at a time, in process and across processes: file locks (embedded mode,
several API processes; a killed holder frees its name at once), and on a real Redis, where a live holder keeps
its lock past the ttl (also through a Redis restart) and a crashed one frees it within the ttl. api.job_files: an
embedded preparation seen from another process (its progress, its failure)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest
import redis.asyncio as aioredis

from docker_http_passthrough.api.job_files import JobFiles
from docker_http_passthrough.shared.errors import NotFound
from docker_http_passthrough.shared.jobs import Progress
from docker_http_passthrough.shared.locks import FileLocks, LocalLocks, RedisLocks
from docker_http_passthrough.shared.redis_clients import async_client
from docker_http_passthrough.shared.settings import Settings

TTL = 1.0


async def holders_overlap(locks, names: list[str], hold: float) -> bool:
    """Hold each name in `names` (repeats allowed) at once; did any two holders of one name overlap?"""
    inside: dict[str, int] = {}
    overlapped = False

    async def one(name: str) -> None:
        nonlocal overlapped
        async with locks.hold(name):
            inside[name] = inside.get(name, 0) + 1
            overlapped |= inside[name] > 1
            await asyncio.sleep(hold)
            inside[name] -= 1

    await asyncio.gather(*(one(name) for name in names))
    return overlapped


@pytest.mark.anyio
async def test_local_locks_one_holder_per_name_and_nothing_left_behind():
    locks = LocalLocks()
    started = time.monotonic()
    assert not await holders_overlap(locks, ["a", "a", "a", "b"], 0.1)
    assert 0.3 <= time.monotonic() - started < 1, "the three holders of 'a' took turns; 'b' did not wait"
    assert locks._locks == {} and locks._users == {}


@pytest.mark.anyio
async def test_redis_locks_one_holder_per_name_even_past_the_ttl(redis_server):
    async with aioredis.Redis.from_url(redis_server.url) as client:
        locks = RedisLocks(client, ttl=TTL, poll=0.05)
        started = time.monotonic()
        # Each holds 1.5 ttl: without renewal the key would expire under the first holder and let the second in.
        assert not await holders_overlap(locks, ["blob-x", "blob-x", "blob-y"], TTL * 1.5)
        assert time.monotonic() - started >= TTL * 3
        assert await client.keys("dhp:lock:*") == []


HOLD_AND_CRASH = """
import asyncio, os, sys
import redis.asyncio as aioredis
from docker_http_passthrough.shared.locks import RedisLocks

async def main():
    client = aioredis.Redis.from_url(sys.argv[1])
    async with RedisLocks(client, ttl=float(sys.argv[2])).hold("blob-z"):
        print("held", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.mark.anyio
async def test_a_crashed_holder_frees_the_name_within_the_ttl(redis_server):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_CRASH, redis_server.url, str(TTL)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        async with aioredis.Redis.from_url(redis_server.url) as client:
            assert await client.exists("dhp:lock:blob-z")
            holder.kill()  # no release: only the expiry can free the name
            holder.wait(10)
            killed = time.monotonic()
            async with RedisLocks(client, ttl=TTL, poll=0.05).hold("blob-z"):
                waited = time.monotonic() - killed
        assert waited <= TTL + 0.5
    finally:
        holder.kill()
        holder.wait(10)


@pytest.mark.anyio
async def test_file_locks_one_holder_per_name_between_tasks_and_processes(tmp_path):
    locks = FileLocks(tmp_path / "locks", poll=0.02)
    assert not await holders_overlap(locks, ["blob-a", "blob-a", "blob-b"], 0.1)
    assert not locks.held("blob-a")
    holder = subprocess.Popen([sys.executable, "-c", FILE_HOLDER, str(tmp_path / "locks")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert locks.held("image-1")  # another process holds it
        holder.kill()  # its descriptor goes with it, and the lock too
        holder.wait(10)
        async with locks.hold("image-1"):
            assert locks.held("image-1")
        assert not locks.held("image-1")
    finally:
        holder.kill()
        holder.wait(10)


FILE_HOLDER = """
import asyncio, sys
from docker_http_passthrough.shared.locks import FileLocks

async def main():
    async with FileLocks(sys.argv[1]).hold("image-1"):
        print("held", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.mark.anyio
async def test_job_files_show_another_process_progress_and_failure(tmp_path):
    files = JobFiles(FileLocks(tmp_path / "locks", poll=0.02))
    assert files.look("job-a") is None
    progress = Progress(layers_total=3, layers_done=1, bytes_total=300, bytes_done=120)
    async with files.running("job-a", progress):
        await asyncio.sleep(0.05)
        assert files.look("job-a") == ("running", progress.as_dict())
    assert files.look("job-a") is None  # done: the store says so

    async def failing() -> None:
        async with files.running("job-b", Progress()):
            await asyncio.sleep(0.1)
            raise NotFound("no such tag")

    async def waiting() -> None:  # waits while the first run holds the job, then shares its outcome
        await asyncio.sleep(0.02)
        async with files.running("job-b", Progress()):
            raise AssertionError("a second run while the first one's failure is fresh")

    results = await asyncio.gather(failing(), waiting(), return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["NotFound", "PassthroughError"]
    assert results[1].status == 404 and results[1].code == results[0].code
    state, error = files.look("job-b")
    assert state == "failed" and error["status"] == 404 and "no such tag" in error["message"]


@pytest.mark.anyio
async def test_a_redis_lock_holder_rides_out_a_restart_of_redis(redis_server):
    """Redis restarts (with its data) while a lock is held: the holder's renewals and release go on; the work
    under the lock is not failed by the blip."""
    settings = Settings(redis_url=redis_server.url, redis_outage_timeout=5)
    client = async_client(settings)
    try:
        locks = RedisLocks(client, ttl=3, poll=0.05)
        async with locks.hold("blob-z"):
            await asyncio.to_thread(redis_server.restart, 0.6)
            await asyncio.sleep(1.5)  # a renewal after the restart
            assert await client.exists("dhp:lock:blob-z")
        assert await client.keys("dhp:lock:*") == []
    finally:
        await client.aclose()
