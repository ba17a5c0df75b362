"""Reading an archive's bytes: any range of a plan, for an HTTP response or a file.

One reader per response: a layer file is opened when first read and closed once the reading has passed it; a
read the page cache can serve is done on the spot (preadv with RWF_NOWAIT: no thread hop, no buffer copy), any
other in a worker thread, so the event loop never waits on a disk. `parts` gives a range as pieces to send
instead: the in-memory members as they are, and file bytes the page cache holds as `FileSpan`s for a zero-copy
send (sendfile) — file bytes it does not hold are read in a thread, as above. A layer file that is missing, or
not the size the plan says, raises ArchiveSourceError at once: the caller must cut the response, so the client
holds a short file.

A layer not in place yet can be read from a file its caller lends (`lend`): a layer still being inflated
(see api.early_gate, which reads only what is written so far). Lent files are the caller's to close.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

from dataclasses import dataclass

import anyio.to_thread

from docker_http_passthrough.shared.archive import ArchivePlan, Segment

# Pieces for write_archive; HTTP responses choose their own (see api.pacer).
WRITE_PIECE = 1 << 20
_NOWAIT = getattr(os, "RWF_NOWAIT", None)
# Before a span goes out with sendfile (which would block the event loop on a disk read), its first and last
# bytes are read with RWF_NOWAIT: if either is not in the page cache, the span is read in a thread instead.
# (Pages come into the cache by sequential readahead and leave it mostly together: the ends tell for the middle.)
# One probe looks this far ahead, so that a slow client's many small spans cost two probes per window, not each.
PROBE_AHEAD = 4 << 20
_probe_byte = bytearray(1)


@dataclass(frozen=True, slots=True)
class FileSpan:
    """`count` bytes at `offset` of the open file `fd`, in the page cache: to send with sendfile."""

    fd: int
    offset: int
    count: int


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
        self.until: dict[str, int] = {}  # path → end (in the archive) of the segment it is open for
        self.cached: dict[str, tuple[int, int]] = {}  # path → a range of the file the page cache was found to hold
        self.lent: dict[str, int] = {}

    def lend(self, path: str, fd: int) -> None:
        """Read the layer planned at `path` from `fd` (the caller's, and the caller's to close) from now on."""
        if self.lent.get(path) != fd:
            self.cached.pop(path, None)  # what the page cache held was another file's
        self.lent[path] = fd

    def _fd(self, seg: Segment) -> int:
        lent = self.lent.get(seg.path)
        if lent is not None:
            return lent
        fd = self.fds.get(seg.path)
        if fd is None:
            fd = self.fds[seg.path] = _open_checked(seg)
        self.until[seg.path] = seg.offset + seg.length
        return fd

    def release_before(self, position: int) -> None:
        """Close the files of the segments that end at or before `position`: a response that has passed a layer
        no longer holds its file (a download holds its socket and one layer file, not every layer's)."""
        if self.until and min(self.until.values()) <= position:
            for path, until in list(self.until.items()):
                if until <= position:
                    os.close(self.fds.pop(path))
                    del self.until[path]

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

    def _probe(self, fd: int, at: int) -> bool:
        """Whether the byte at `at` is in the page cache (False too past the end of the file)."""
        try:
            return os.preadv(fd, [_probe_byte], at, _NOWAIT) == 1
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                ArchiveReader.nowait_supported = False
                return False
            raise

    def _cached(self, seg: Segment, fd: int, offset: int, count: int) -> bool:
        """Whether the page cache holds [offset, offset + count) of the segment's file, as far as its ends tell
        (or the ends of a window around it that an earlier probe found cached)."""
        end = offset + count
        known_from, known_to = self.cached.get(seg.path, (0, 0))
        if known_from <= offset and end <= known_to:
            return True
        if not self.nowait_supported or not self._probe(fd, offset):
            return False
        ahead = min(seg.length, offset + PROBE_AHEAD)
        if ahead > end and self._probe(fd, ahead - 1):
            self.cached[seg.path] = (offset, ahead)
            return True
        return self._probe(fd, end - 1)  # a window end may not be written yet (a layer still being inflated)

    async def parts(self, start: int, end: int) -> list[memoryview | FileSpan]:
        """Bytes [start, end) as pieces to send in order: memory, or a FileSpan of cached file bytes."""
        out: list[memoryview | FileSpan] = []
        for seg, lo, n in self.plan.spans(start, end):
            if seg.data is not None:
                out.append(memoryview(seg.data)[lo : lo + n])
                continue
            fd = self._fd(seg)
            if self._cached(seg, fd, lo, n):
                out.append(FileSpan(fd, lo, n))
            else:
                view = memoryview(bytearray(n))
                await anyio.to_thread.run_sync(self._read_file, seg, view, lo, False)
                out.append(view)
        return out

    def read_now(self, start: int, end: int) -> memoryview:
        """Bytes [start, end), blocking on the disk if need be (not on an event loop)."""
        return self._fill(start, end, nowait=False)

    async def read(self, start: int, end: int) -> memoryview:
        """Bytes [start, end). A caller that sends them in a loop must give the event loop a turn per piece: a
        read the page cache serves awaits nothing, nor does a send to a client that hung up."""
        data = self._fill(start, end, nowait=True) if self.nowait_supported else None
        if data is None:
            data = await anyio.to_thread.run_sync(self.read_now, start, end)
        return data

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self.until.clear()
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
