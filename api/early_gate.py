"""The gate of an early-start stream: how far the archive's bytes may go out now, and which file they come from.

- The headers and small files between layers: at once (the plan is exact).
- A layer's bytes: from the layer itself once this preparation verified it for this registry and repository;
  before that, from the file it is being inflated into, up to what its writer published (`shared.growing_layer`).
- The end (config, `manifest.json`, `repositories`): only once the whole image verified, every layer has the size
  the headers announced, and every byte read from a file that did not become the layer (its writer died and a
  re-run took over) equals the layer's.
Anything else — the preparation failed for good, a layer is not the size announced, bytes differ — raises
EarlyStreamAborted: the server closes the connection, and the client holds a short file that `docker load`
rejects (it has no manifest.json), never a wrong one.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_right
from dataclasses import dataclass, field

from docker_http_passthrough.api.early_stream import EarlyPlan
from docker_http_passthrough.api.preparation import PreparationWatch
from docker_http_passthrough.shared.archive import Segment
from docker_http_passthrough.shared.archive_reader import ArchiveReader
from docker_http_passthrough.shared.errors import PassthroughError
from docker_http_passthrough.shared.growing_layer import growth
from docker_http_passthrough.shared.store import Store

# How often a waiting stream looks for more bytes (a few file reads each time).
POLL = 0.1
COMPARE_PIECE = 1 << 20
_OPEN = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)


class EarlyStreamAborted(Exception):
    """Raised inside the response body: the server closes the connection, the client holds a short file."""


@dataclass
class _Layer:
    segment: Segment
    digest: str
    diff_id: str
    final: int | None = None  # descriptor of the verified layer, once it is
    temps: dict[str, int] = field(default_factory=dict)  # temp file name → descriptor, kept to the end
    reads: list[list[int]] = field(default_factory=list)  # [descriptor, start, end] lent from temp files
    growing: int | None = None  # the temp file last looked at, and how much of it was readable then
    readable: int = 0

    def lent(self, fd: int, start: int, end: int) -> None:
        if self.reads and self.reads[-1][0] == fd and self.reads[-1][2] >= start:
            self.reads[-1][2] = max(self.reads[-1][2], end)
        else:
            self.reads.append([fd, start, end])

    def close(self) -> None:
        for fd in [*self.temps.values(), *([self.final] if self.final is not None else [])]:
            os.close(fd)
        self.temps.clear()
        self.final = None


class EarlyGate:
    def __init__(self, early: EarlyPlan, store: Store, registry: str, repository: str, key: str,
                 watch: PreparationWatch, timeout: float):
        """`key`: the image's key in the store; `timeout`: the longest the stream waits, all told."""
        self.plan, self.store, self.registry, self.repository, self.key = early.plan, store, registry, repository, key
        self.watch = watch
        self.sizes = [layer.size for layer in early.layers]
        files = [segment for segment in early.plan.segments if segment.path is not None]
        self.layers = {segment.offset: _Layer(segment, layer.digest, layer.diff_id)
                       for segment, layer in zip(files, [x for x in early.layers if x.size], strict=True)}
        self.tail = max((s.offset + s.length for s in files), default=0)
        self.end_open = False  # the image verified: the end may go out
        self.deadline = asyncio.get_running_loop().time() + timeout

    async def __call__(self, position: int, reader: ArchiveReader) -> int:
        if position >= self.tail:
            if not self.end_open:
                await self._image_verified()
                self.end_open = True
            return self.plan.size
        segment = self.plan.segments[bisect_right(self.plan.offsets, position) - 1]
        if segment.path is None:
            return min(segment.offset + segment.length, self.tail)
        return await self._layer_bytes(self.layers[segment.offset], position - segment.offset, reader)

    # --- a layer

    def _verified(self, layer: _Layer) -> bool:
        return (self.store.linked_diff_id(layer.digest) == layer.diff_id
                and self.store.seen(self.registry, self.repository, layer.digest))

    def _open_final(self, layer: _Layer) -> bool:
        if not self._verified(layer):
            return False
        try:
            fd = os.open(self.store.layer_path(layer.diff_id), _OPEN)
        except FileNotFoundError:
            return False
        layer.final = fd
        size = os.fstat(fd).st_size
        if size != layer.segment.length:
            raise EarlyStreamAborted(f"layer {layer.digest} is {size} bytes, not the {layer.segment.length} "
                                     "announced")
        return True

    def _look_at_growth(self, layer: _Layer) -> None:
        """Learn which temp file the layer is being inflated into, and how much of it is readable."""
        found = growth(self.store, self.registry, self.repository, layer.digest, layer.diff_id)
        if found is None:
            return
        if found.written > layer.segment.length:
            raise EarlyStreamAborted(f"layer {layer.digest} is longer than the {layer.segment.length} bytes "
                                     "announced")
        fd = layer.temps.get(found.path.name)
        if fd is None:
            try:
                fd = layer.temps[found.path.name] = os.open(found.path, _OPEN)
            except FileNotFoundError:
                return  # just linked into place, or its dead writer's leftovers were removed
        # On NFS the record may be fresher than this host's view of the file: read what both agree on.
        layer.growing, layer.readable = fd, min(found.written, os.fstat(fd).st_size)

    def _look(self, layer: _Layer) -> None:
        if not self._open_final(layer):
            self._look_at_growth(layer)

    def _available(self, layer: _Layer, offset: int, reader: ArchiveReader) -> int | None:
        """Where the bytes of the layer from `offset` that may go out now end (lending the reader their file)."""
        segment = layer.segment
        if layer.final is not None:
            reader.lend(segment.path, layer.final)
            return segment.offset + segment.length
        if layer.growing is not None and layer.readable > offset:
            reader.lend(segment.path, layer.growing)
            layer.lent(layer.growing, offset, layer.readable)
            return segment.offset + layer.readable
        return None

    async def _layer_bytes(self, layer: _Layer, offset: int, reader: ArchiveReader) -> int:
        """What was learned before serves until the stream catches up; then look again, and wait if need be."""
        while True:
            available = self._available(layer, offset, reader)
            if available is not None:
                return available
            self._look(layer)
            if (available := self._available(layer, offset, reader)) is not None:
                return available
            ended = await self._preparation_ended()
            self._look(layer)  # again: a layer verified just before the preparation ended is seen
            if (available := self._available(layer, offset, reader)) is not None:
                return available
            if ended:
                raise EarlyStreamAborted(f"the preparation ended without layer {layer.digest} in the store")
            await self._pause(f"layer {layer.digest}")

    # --- the end

    async def _image_verified(self) -> None:
        while True:
            try:
                record = await self.watch.outcome()  # the preparer's own record, once complete in the store
            except PassthroughError as exc:
                raise EarlyStreamAborted(f"preparation failed after the response started: {exc.message}") from None
            if record is not None:
                break
            await self._pause("the image to verify")
        verified = [layer.size for layer in record.layers]
        if verified != self.sizes:
            raise EarlyStreamAborted(f"the layers are {verified} bytes, not the {self.sizes} announced")
        await asyncio.to_thread(self._check_reads)

    def _check_reads(self) -> None:
        """Bytes lent from a file that is not the verified layer (a writer that died) must equal the layer's."""
        for layer in self.layers.values():
            final = os.stat(self.store.layer_path(layer.diff_id))
            for fd, start, end in layer.reads:
                here = os.fstat(fd)
                if (here.st_dev, here.st_ino) != (final.st_dev, final.st_ino) and \
                        not _same_bytes(fd, str(self.store.layer_path(layer.diff_id)), start, end):
                    raise EarlyStreamAborted(f"bytes of layer {layer.digest} read while a writer that did not "
                                             "finish wrote them differ from the verified layer")

    # --- waiting

    async def _preparation_ended(self) -> bool:
        try:
            return await self.watch.outcome() is not None
        except PassthroughError as exc:
            raise EarlyStreamAborted(f"preparation failed after the response started: {exc.message}") from None

    async def _pause(self, what: str) -> None:
        if asyncio.get_running_loop().time() > self.deadline:
            raise EarlyStreamAborted(f"gave up waiting for {what}")
        await asyncio.sleep(POLL)

    def close(self) -> None:
        for layer in self.layers.values():
            layer.close()
        self.watch.close()


def _same_bytes(fd: int, path: str, start: int, end: int) -> bool:
    try:
        with open(path, "rb") as other:
            for offset in range(start, end, COMPARE_PIECE):
                length = min(COMPARE_PIECE, end - offset)
                if os.pread(fd, length, offset) != os.pread(other.fileno(), length, offset):
                    return False
    except OSError:
        return False  # a dead writer's file removed under us (NFS: ESTALE): unproven is wrong
    return True
