"""The one way an archive's bytes leave the server, warm or early-start: one `ArchiveReader`, pieces sized by
the `PiecePacer`, and leases on every layer so no eviction removes one mid-stream.

An early-start stream passes a gate (see `early_gate`) that says how far the bytes may go now and lends the
reader the file a layer is being inflated into, and holds the end back until the whole image verified. A layer
file that is missing or not the planned size raises ArchiveSourceError at once: the server then cuts the
connection, and the client holds a short file, never a wrong one.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Protocol, Sequence

from docker_http_passthrough.api.pacer import PiecePacer
from docker_http_passthrough.shared.archive import ArchivePlan
from docker_http_passthrough.shared.archive_reader import ArchiveReader
from docker_http_passthrough.shared.eviction import held_leases, record_use
from docker_http_passthrough.shared.store import Store


class Gate(Protocol):
    async def __call__(self, position: int, reader: ArchiveReader) -> int:
        """Wait until bytes from `position` may go out (lending `reader` what to read them from); return where
        that permission ends."""

    def close(self) -> None:
        """The stream ended: release what the gate holds."""


async def stream_archive(store: Store, plan: ArchivePlan, diff_ids: Sequence[str], start: int, end: int,
                         gate: Gate | None = None) -> AsyncIterator[memoryview]:
    """Bytes [start, end) of the archive."""
    record_use(store, diff_ids)
    loop = asyncio.get_running_loop()
    pacer = PiecePacer(loop.time())
    try:
        async with held_leases(store, diff_ids):
            with ArchiveReader(plan) as reader:
                position = start
                while position < end:
                    allowed = end
                    if gate is not None:
                        waiting_since = loop.time()
                        allowed = min(end, await gate(position, reader))
                        pacer.waited(loop.time() - waiting_since)
                    data = await reader.read(position, min(position + pacer.piece, allowed))
                    sent_at = loop.time()
                    yield data  # returns once the server has handed it to a draining socket
                    position += len(data)
                    pacer.sent(len(data), sent_at, loop.time())
    finally:
        if gate is not None:
            gate.close()
