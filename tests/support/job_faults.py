"""Helpers for the job-side fault tests (tests/test_e2e_job_faults.py) and scripts/faults.py: which worker runs a
job, what a dead worker left behind in the store and in Redis, and a small volume that fills up.

- ``running_job``: the id of the one preparation job that beats, and ``worker_of``: the WorkerProcess running it.
- ``leftovers``: temp files and leases in a store and our per-job keys in Redis that nothing should hold any more.
- ``rq_registered``: the worker names in RQ's worker set.
- ``small_volume``: a tmpfs of a given size mounted on a directory (root only), unmounted afterwards.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import redis

from tests.support.faults import stray_files
from tests.support.services import WorkerProcess, require

# Our keys that only a running job holds: none may stay once every job ended.
JOB_KEY_PATTERNS = ("dhp:heartbeat:*", "dhp:progress:*", "dhp:credentials:*", "dhp:lock:*", "dhp:burying:*")


def running_job(client: redis.Redis) -> str | None:
    keys = client.keys("dhp:heartbeat:*")
    return keys[0].decode().removeprefix("dhp:heartbeat:") if keys else None


def worker_name_of(client: redis.Redis, job_id: str) -> str:
    return client.hget(f"rq:job:{job_id}", "worker_name").decode()


def worker_of(client: redis.Redis, job_id: str, workers: Sequence[WorkerProcess]) -> tuple[WorkerProcess, str]:
    """The worker process running ``job_id``, and its RQ name."""
    name = worker_name_of(client, job_id)
    pid = int(client.hget(f"rq:worker:{name}", "pid"))
    return next(worker for worker in workers if worker.pid == pid), name


def rq_registered(client: redis.Redis) -> set[str]:
    return {key.decode().removeprefix("rq:worker:") for key in client.smembers("rq:workers")}


def files_of(cache_dir: Path, owner: str) -> list[str]:
    """Temp and lease files whose name carries this owner's token."""
    return sorted(str(p.relative_to(cache_dir)) for p in Path(cache_dir).rglob(f"*{owner}-*"))


def leftovers(cache_dir: Path, client: redis.Redis | None = None) -> list[str]:
    """What nothing should hold once every download and job ended: temp files, leases, per-job Redis keys."""
    found = stray_files(cache_dir)
    leases = Path(cache_dir) / "leases"
    found += [f"leases/{name}" for name in sorted(os.listdir(leases))] if leases.is_dir() else []
    if client is not None:
        found += sorted(key.decode() for pattern in JOB_KEY_PATTERNS for key in client.keys(pattern))
    return found


@contextlib.contextmanager
def small_volume(directory: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. "24m") on ``directory``: a volume that fills up for real."""
    require(os.geteuid() == 0, "a small volume needs root to mount a tmpfs")
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                             capture_output=True, text=True)
    require(mounted.returncode == 0, f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def fill(directory: Path, leave_free: int) -> Path:
    """A file that takes all free space of ``directory``'s volume but ``leave_free`` bytes."""
    stats = os.statvfs(directory)
    size = max(stats.f_bavail * stats.f_frsize - leave_free, 0)
    filler = directory / "filler.bin"
    with open(filler, "wb") as handle:
        handle.truncate(0)
        for _ in range(size >> 20):
            handle.write(b"\0" * (1 << 20))
        handle.write(b"\0" * (size & ((1 << 20) - 1)))
    return filler
