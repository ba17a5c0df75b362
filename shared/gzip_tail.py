"""What the last bytes of a gzip blob say about the size of what it inflates to, without downloading it.

A gzip member ends with CRC32 and ISIZE (the size of its input modulo 4 GiB). For a blob of one member that is
the layer's size; for a blob of several (bgzip, eStargz, concatenated files) it is the last member's only. So the
tail (a ranged read of the last TAIL_WINDOW bytes) is searched for the start of a member: a `1f 8b 08` from which
the bytes inflate to a complete member whose CRC32 and ISIZE zlib verifies.

- The whole blob is in the window: every member is inflated and counted (exact).
- A member starts inside the window, after the blob's first byte: several members, the size is unknown (the
  caller learns it once the layer is unpacked).
- None starts inside the window: the last member began before it, most likely at byte 0 (one member). ISIZE is
  then the size modulo 4 GiB, lifted by 4 GiB steps to the least size the compressed size allows (deflate never
  grows data by more than an eighth). If that needs more than deflate's largest ratio (1032:1), one
  member is impossible: several. Otherwise this is the one guess; a blob of members longer than the window whose
  last one inflates to more than the whole blob's compressed size looks the same. A wrong guess is caught when
  the layer is unpacked (see api.early_gate), and the response is cut before its end: never a wrong archive.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

TAIL_WINDOW = 64 << 10
_MAGIC = b"\x1f\x8b\x08"
_ISIZE_MODULO = 1 << 32
# Deflate cannot shrink data more than this (258-byte matches in 2-bit codes, and then some).
_MAX_RATIO = 1032
# Inflate at most this much per call while counting (memory stays bounded whatever the ratio).
_STEP = 4 << 20
# Candidates tried per window; compressed data rarely holds even one false `1f 8b 08`.
_MAX_CANDIDATES = 64


@dataclass(frozen=True)
class TailSize:
    size: int | None  # bytes of the inflated layer; None: not knowable from the tail
    how: str  # why, for the log: "whole blob", "one member (ISIZE)", "several gzip members", …

    @property
    def exact(self) -> bool:
        """Counted, not inferred from ISIZE."""
        return self.how == "whole blob"


def _member_end(data: bytes, start: int) -> int | None:
    """Where the complete, verified gzip member starting at `start` ends; None if none starts there."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        rest = data[start:]
        while rest and not inflater.eof:
            inflater.decompress(rest, _STEP)
            rest = inflater.unconsumed_tail
    except zlib.error:
        return None
    if not inflater.eof:
        return None
    return len(data) - len(inflater.unused_data)


def _inflated_length(blob: bytes) -> int | None:
    """Bytes all members of a whole blob inflate to (zero padding after the last allowed); None if not gzip."""
    total, rest = 0, blob
    try:
        while rest.strip(b"\0"):
            inflater = zlib.decompressobj(wbits=31)
            while rest and not inflater.eof:
                total += len(inflater.decompress(rest, _STEP))
                rest = inflater.unconsumed_tail
            if not inflater.eof:
                return None
            rest = inflater.unused_data
    except zlib.error:
        return None
    return total


def _least_inflated(blob_size: int) -> int:
    """No gzip blob inflates to less than this: deflate grows incompressible data by at most an eighth (fixed
    Huffman codes, 9 bits for some literals; zlib's stored blocks add 5 bytes per 16 KiB, 0.03 %), a member
    header and trailer 18 bytes plus optional fields (allow 4 KiB of them)."""
    return max(0, blob_size - (blob_size >> 3) - 4096)


def size_from_tail(tail: bytes, blob_size: int) -> TailSize:
    """The inflated size of a gzip blob of `blob_size` bytes whose last bytes are `tail`."""
    if len(tail) < 18 or len(tail) > blob_size:
        return TailSize(None, "blob too short for gzip")
    if len(tail) == blob_size:
        size = _inflated_length(tail)
        return TailSize(size, "whole blob" if size is not None else "not gzip")
    start = 0
    for _ in range(_MAX_CANDIDATES):
        start = tail.find(_MAGIC, start)
        if start < 0:
            break
        if _member_end(tail, start) is not None:
            return TailSize(None, "several gzip members")
        start += 1
    isize = struct.unpack("<I", tail[-4:])[0]
    # A tar is a whole number of 512-byte blocks (2**32 is one too); zero padding after the stream ends in zeros.
    if not isize or isize % 512:
        return TailSize(None, "no usable size trailer")
    least = _least_inflated(blob_size)
    if isize < least:
        isize += -(-(least - isize) // _ISIZE_MODULO) * _ISIZE_MODULO
        if isize > blob_size * _MAX_RATIO:
            return TailSize(None, "several gzip members")  # the last member is smaller than the blob
    return TailSize(isize, "one member (ISIZE)")
