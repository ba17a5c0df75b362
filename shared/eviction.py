"""Keeping the store under CACHE_MAX_BYTES: least-recently-used layers go first, leased layers never.

Last use is recorded by us (atime is unreliable under relatime/noatime): the mtime of `used/<hex>`.
A lease is a file `leases/<hex>.<owner>-<random>` whose mtime its holder refreshes while it streams or prepares
the layer; a lease untouched for LEASE_TTL belongs to a crashed process and no longer protects anything (and
a worker's leases go at once when it is known dead, see `owners`).
Any number of API and worker processes on any hosts may evict at once: each removal is a single unlink.
A full volume makes room the same way (`evict(..., free=…)`), before a failed layer write is tried again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import AsyncIterator, Iterable, Iterator

from docker_http_passthrough.shared.digests import digest_hex
from docker_http_passthrough.shared.metrics import EVICTIONS
from docker_http_passthrough.shared.owners import lease_owned_by, owned_name
from docker_http_passthrough.shared.store import FULL, Store

log = logging.getLogger("docker_http_passthrough.eviction")

LEASE_TTL = 300.0
LEASE_REFRESH = 60.0


def _touch(path: Path, when: float | None = None) -> None:
    try:
        try:
            os.utime(path, (when, when) if when is not None else None)
        except FileNotFoundError:
            path.touch()
            if when is not None:
                os.utime(path, (when, when))
    except OSError as exc:
        if exc.errno not in FULL:
            raise
        # A full volume must not stop warm downloads: the use record or lease is missing until space is back.
        log.warning("cannot record %s: the store's volume is full", path.name)


def record_use(store: Store, diff_ids: Iterable[str]) -> None:
    for diff_id in diff_ids:
        _touch(store.root / "used" / digest_hex(diff_id))


class Leases:
    """Lease files for a set of layers; `refresh()` is cheap to call often (it acts once a minute)."""

    def __init__(self, store: Store, diff_ids: Iterable[str]):
        token = owned_name(store.owner)
        self.paths = [store.root / "leases" / f"{digest_hex(d)}.{token}" for d in set(diff_ids)]
        self.refreshed = 0.0

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.refreshed >= LEASE_REFRESH:
            for path in self.paths:
                _touch(path)
            self.refreshed = now

    def release(self) -> None:
        for path in self.paths:
            path.unlink(missing_ok=True)

    async def keep_fresh(self) -> None:
        """Refresh until cancelled, however long the holder waits (on a registry, on a stalled client)."""
        while True:
            await asyncio.sleep(LEASE_REFRESH)
            self.refresh(force=True)


@contextmanager
def leased(store: Store, diff_ids: Iterable[str]) -> Iterator[Leases]:
    leases = Leases(store, diff_ids)
    leases.refresh(force=True)
    try:
        yield leases
    finally:
        leases.release()


@asynccontextmanager
async def held_leases(store: Store, diff_ids: Iterable[str]) -> AsyncIterator[Leases]:
    """Leases for async holders, kept fresh by a task of their own for as long as they are held."""
    with leased(store, diff_ids) as leases:
        keeper = asyncio.create_task(leases.keep_fresh())
        try:
            yield leases
        finally:
            keeper.cancel()


def _leased_layers(store: Store) -> set[str]:
    cutoff = time.time() - LEASE_TTL
    alive = set()
    for path in (store.root / "leases").iterdir():
        try:
            if path.stat().st_mtime >= cutoff:
                alive.add(path.name.split(".")[0])
            else:
                path.unlink(missing_ok=True)  # its holder died
        except FileNotFoundError:
            pass
    return alive


def remove_leases_of(store: Store, owner: str) -> int:
    """Remove the leases of `owner`, a process known to be dead; returns how many."""
    removed = 0
    for path in (store.root / "leases").iterdir():
        if lease_owned_by(path.name, owner):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def evict(store: Store, max_bytes: int, *, free: int = 0) -> list[str]:
    """Remove least-recently-used, unleased layers until the layers fit in max_bytes, and (to make room on a
    full volume) until at least `free` bytes of layers went; returns the removed hexes."""
    if max_bytes <= 0:
        return []
    layers = []
    total = 0
    for path in (store.root / "layers" / "sha256").iterdir():
        if not path.name.endswith(".tar"):
            continue  # temp files of running writers
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        hex_id = path.name[:-4]
        try:
            last_use = (store.root / "used" / hex_id).stat().st_mtime
        except FileNotFoundError:
            last_use = stat.st_mtime
        layers.append((last_use, hex_id, path, stat.st_size))
        total += stat.st_size
    if free:
        max_bytes = max(min(max_bytes, total - free), 0)
    if total <= max_bytes:
        return []
    protected = _leased_layers(store)
    removed = []
    for _last_use, hex_id, path, size in sorted(layers):
        if total <= max_bytes:
            break
        if hex_id in protected:
            continue
        path.unlink(missing_ok=True)
        (store.root / "used" / hex_id).unlink(missing_ok=True)
        total -= size
        removed.append(hex_id)
    if removed:
        EVICTIONS.inc(len(removed))
        log.info("evicted %d layers to keep the store under %d bytes (now %d)", len(removed), max_bytes, total)
    return removed
