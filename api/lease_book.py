"""The leases and use records of one API process's downloads.

While a layer is being sent, a lease file keeps eviction off it (see shared.eviction). Per download that was a
file created, refreshed and removed for every layer — a fleet of a thousand devices on a 4-layer image made 4,000
lease files and 8,000 more file operations on the store, often NFS. The book keeps one lease per layer for the
whole process instead: the first download of a layer creates it, the last one to finish removes it, and one task
refreshes every lease the process holds. The use of a layer (for least-recently-used eviction) is recorded then
too: when its first download here starts and when its last one ends. Eviction sees the same as before: a fresh
lease on every layer being sent, and the layers in use, or used last, as the most recently used.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Iterable

from docker_http_passthrough.shared.eviction import LEASE_REFRESH, Leases, record_use
from docker_http_passthrough.shared.store import Store


class LeaseBook:
    def __init__(self, store: Store):
        self.store = store
        self.leases: dict[str, Leases] = {}
        self.holders: dict[str, int] = {}
        self.keeper: asyncio.Task | None = None

    @contextlib.asynccontextmanager
    async def hold(self, diff_ids: Iterable[str]) -> AsyncIterator[None]:
        """Lease these layers for as long as the block runs, and note their use."""
        layers = set(diff_ids)
        first = [diff_id for diff_id in layers if diff_id not in self.leases]
        record_use(self.store, first)
        for diff_id in first:
            self.leases[diff_id] = Leases(self.store, [diff_id])
            self.leases[diff_id].refresh(force=True)
        for diff_id in layers:
            self.holders[diff_id] = self.holders.get(diff_id, 0) + 1
        if self.keeper is None or self.keeper.done():
            self.keeper = asyncio.create_task(self._keep_fresh())
        try:
            yield
        finally:
            last = []
            for diff_id in layers:
                self.holders[diff_id] -= 1
                if not self.holders[diff_id]:
                    del self.holders[diff_id]
                    self.leases.pop(diff_id).release()
                    last.append(diff_id)
            record_use(self.store, last)

    async def _keep_fresh(self) -> None:
        while self.leases:
            await asyncio.sleep(LEASE_REFRESH)
            for leases in list(self.leases.values()):
                leases.refresh(force=True)

    def close(self) -> None:
        if self.keeper is not None:
            self.keeper.cancel()
