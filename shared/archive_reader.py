"""Reading an archive's bytes: any range of a plan, for an HTTP response or a file.

One reader per response: layer files are opened once; a read the page cache can serve is done on the spot
(preadv with RWF_NOWAIT: no thread hop, no buffer copy), any other in a worker thread, so the event loop
never waits on a disk. A layer file that is missing, or not the size the plan says, raises
ArchiveSourceError at once: the caller must cut the response, so the client holds a short file.

A layer not in place yet can be read from a file its caller lends (`lend`): a layer still being inflated
(see api.early_gate, which reads only what is written so far).
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from typing import BinaryIO

import anyio.to_thread

from docker_http_passthrough.shared.archive import ArchivePlan, Segment

# Pieces for write_archive; HTTP responses choose their own (see api.pacer).
WRITE_PIECE = 1 << 20
_NOWAIT = getattr(os, "RWF_NOWAIT", None)


class ArchiveSourceError(Exception):
    """A layer file vanished or changed size while streaming; the caller must
    abort the response (close the connection) so the client holds a short file."""


def _open_checked(seg: Segment) -> int:
    """Open a layer file and make sure it still has the planned size."""
    assert seg.path is not None
    try:
        fd = os.open(seg.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ArchiveSourceError(f"layer file {seg.path} unavailable: {exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != seg.length:
            raise ArchiveSourceError(
                f"layer file {seg.path} is {st.st_size} bytes, expected {seg.length}"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


class ArchiveReader:
    """Reads ranges of one archive; close() it (or use it as a context manager) when done."""

    nowait_supported = _NOWAIT is not None

    def __init__(self, plan: ArchivePlan):
        self.plan = plan
        self.fds: dict[str, int] = {}
        self.lent: dict[str, int] = {}

    def lend(self, path: str, fd: int) -> None:
        """Read the layer planned at `path` from `fd` (the caller's, and the caller's to close) from now on."""
        self.lent[path] = fd

    def _fd(self, seg: Segment) -> int:
        lent = self.lent.get(seg.path)
        if lent is not None:
            return lent
        fd = self.fds.get(seg.path)
        if fd is None:
            fd = self.fds[seg.path] = _open_checked(seg)
        return fd

    def _fill(self, start: int, end: int, nowait: bool) -> memoryview | None:
        """Bytes [start, end); None when `nowait` and the page cache cannot serve them all."""
        view = memoryview(bytearray(end - start))
        pos = 0
        for seg, lo, n in self.plan.spans(start, end):
            if seg.data is not None:
                view[pos : pos + n] = seg.data[lo : lo + n]
            elif not self._read_file(seg, view[pos : pos + n], lo, nowait):
                return None
            pos += n
        return view

    def _read_file(self, seg: Segment, into: memoryview, offset: int, nowait: bool) -> bool:
        fd = self._fd(seg)
        got = 0
        while got < len(into):
            try:
                k = os.preadv(fd, [into[got:]], offset + got, _NOWAIT if nowait else 0)
            except BlockingIOError:
                return False  # not in the page cache: the caller reads in a thread
            except OSError as exc:
                if nowait and exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    ArchiveReader.nowait_supported = False  # this filesystem cannot say
                    return False
                raise
            if k == 0:
                if nowait:
                    return False
                raise ArchiveSourceError(f"layer file {seg.path} ended early at {offset + got}")
            got += k
        return True

    def read_now(self, start: int, end: int) -> memoryview:
        """Bytes [start, end), blocking on the disk if need be (not on an event loop)."""
        return self._fill(start, end, nowait=False)

    async def read(self, start: int, end: int) -> memoryview:
        data = self._fill(start, end, nowait=True) if self.nowait_supported else None
        if data is None:
            data = await anyio.to_thread.run_sync(self.read_now, start, end)
        else:
            # Always give the loop a turn: a server's send() to a client that hung up returns at once, and
            # without this a stream would read the rest of the archive before its cancellation could land.
            await asyncio.sleep(0)
        return data

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self.lent.clear()

    def __enter__(self) -> "ArchiveReader":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def write_archive(plan: ArchivePlan, out: BinaryIO) -> None:
    """Write the whole archive to ``out``."""
    with ArchiveReader(plan) as reader:
        for start in range(0, plan.size, WRITE_PIECE):
            out.write(reader.read_now(start, min(start + WRITE_PIECE, plan.size)))
