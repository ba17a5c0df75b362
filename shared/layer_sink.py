"""The one-pass layer sink: a layer blob goes in piece by piece, its tar comes out, both hashed on the way.

Runs in a worker thread (hashing and inflating are CPU work). Handles concatenated gzip members and zero
padding after the last one, and zstd streams of several frames, skippable frames among them, however the blob
was cut into pieces.
"""

from __future__ import annotations

import hashlib
import threading
from typing import BinaryIO

from docker_http_passthrough.shared.errors import LimitExceeded

try:  # isal inflates ~1.7x faster than stdlib zlib, same interface
    from isal import isal_zlib as zlib_impl
except ImportError:  # pragma: no cover
    import zlib as zlib_impl
try:  # Python 3.14's own zstd; the backport has the same API. Both bound each call's output (max_length),
    from compression import zstd  # which python-zstandard's decompressobj cannot.
except ImportError:  # pragma: no cover - before 3.14
    from backports import zstd

COMPRESSIONS = (None, "gzip", "zstd")

# Bytes of a blob that another registry must show us before we reuse our stored copy for it.
TAIL_SIZE = 32
# Inflate at most this much per call, so a small, highly compressed input cannot balloon memory.
INFLATE_STEP = 4 << 20


class TarBudget:
    """The unpacked bytes an image may still take (IMAGE_MAX_BYTES), shared by its layers' sinks (threads): a
    gzip or zstd bomb stops within one inflate step of the limit instead of filling the disk."""

    def __init__(self, limit: int):
        self.limit = limit
        self.left = limit
        self.lock = threading.Lock()

    def take(self, size: int) -> None:
        with self.lock:
            self.left -= size
            if self.left < 0:
                raise LimitExceeded(f"the image unpacks to more than IMAGE_MAX_BYTES={self.limit} bytes")

    def refund(self, size: int) -> None:
        """Give back what a failed write took, before it is written again."""
        with self.lock:
            self.left = min(self.limit, self.left + size)


class LayerSink:
    """Hashes the blob as sent, inflates it if needed, hashes and writes the tar. Runs in a worker thread.

    A stream that does not inflate is remembered, not raised at once: the blob is still hashed to the end, so
    the error can say whether the registry sent the wrong bytes (digest mismatch) or a broken gzip or zstd.
    """

    def __init__(self, out: BinaryIO, compression: str | None, budget: TarBudget | None = None):
        if compression not in COMPRESSIONS:
            raise ValueError(f"unknown layer compression {compression!r}")
        self.out = out
        self.compression = compression
        self.budget = budget
        self.blob_hash = hashlib.sha256()
        self.tar_hash = hashlib.sha256()
        self.blob_size = 0
        self.tar_size = 0
        self.inflater = _inflater(compression) if compression else None
        self.inflate_error: str | None = None
        self.padding = False  # past the last gzip member: only zeros may follow
        self.blob_tail = b""  # the blob's last TAIL_SIZE bytes, kept as proof material (see possession.possessed)

    def _emit(self, data: bytes) -> None:
        if self.budget is not None:
            self.budget.take(len(data))
        self.tar_hash.update(data)
        self.tar_size += len(data)
        self.out.write(data)

    def feed(self, data: bytes) -> None:
        self.blob_hash.update(data)
        self.blob_size += len(data)
        self.blob_tail = (self.blob_tail + data[-TAIL_SIZE:])[-TAIL_SIZE:]
        if self.inflater is None:
            self._emit(data)
        elif self.inflate_error is None:
            try:
                (self._inflate_zstd if self.compression == "zstd" else self._inflate_gzip)(data)
            except (zlib_impl.error, zstd.ZstdError, EOFError) as exc:
                self.inflate_error = f"not valid {self.compression} ({exc})"

    def _inflate_gzip(self, data: bytes) -> None:
        if self.padding:
            if data.strip(b"\0"):
                raise zlib_impl.error("data after the end of the gzip stream")
            return
        while data:
            if self.inflater.eof:
                if not data.strip(b"\0"):
                    # Zero padding after the last member, as some tools write: a member starts with 1f 8b, so
                    # zeros here can only be padding, however the download was cut into pieces.
                    self.padding = True
                    return
                # Concatenated gzip members (pigz, some builders): start a fresh member.
                self.inflater = _inflater("gzip")
            self._emit(self.inflater.decompress(data, INFLATE_STEP))
            data = self.inflater.unused_data if self.inflater.eof else self.inflater.unconsumed_tail

    def _inflate_zstd(self, data: bytes) -> None:
        """Frame after frame: each decompressor reads one (a skippable frame is one with no output); at most
        INFLATE_STEP comes out per call, the rest waits inside the decompressor until asked for with b""."""
        while True:
            if self.inflater.eof:
                data = self.inflater.unused_data + data
                if not data:
                    return
                self.inflater = _inflater("zstd")
            self._emit(self.inflater.decompress(data, INFLATE_STEP))
            data = b""
            if not self.inflater.eof and self.inflater.needs_input:
                return

    def finish(self) -> None:
        if self.inflater is None or self.inflate_error is not None:
            return
        if self.compression == "gzip":
            self._emit(self.inflater.flush())
        if not self.inflater.eof and self.blob_size:
            self.inflate_error = f"a {self.compression} stream that ends early"


def _inflater(compression: str):
    return zstd.ZstdDecompressor() if compression == "zstd" else zlib_impl.decompressobj(wbits=31)
