"""Single byte ranges (RFC 9110 §14) for resuming a download; the archive is assembled on the fly, so we do it."""

from __future__ import annotations

import re

# ASCII digits only (a bare \d would take any Unicode digit); the range unit is case-insensitive.
_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.IGNORECASE)


# Any position past this is past every archive; int() of thousands of digits would raise (and cost time).
_HUGE = 10**30


class UnsatisfiableRange(Exception):
    pass


def _position(digits: str) -> int:
    return int(digits) if len(digits) <= 30 else _HUGE


def _less(a: str, b: str) -> bool:
    """a < b for digit strings of any length."""
    a, b = a.lstrip("0") or "0", b.lstrip("0") or "0"
    return (len(a), a) < (len(b), b)


def requested_range(header: str | None, if_range: str | None, etag: str, size: int) -> tuple[int, int] | None:
    """The [start, end) a request asks for, or None for the whole archive.

    Multi-range, malformed and invalid (last < first) specs are ignored, as RFC 9110 §14.2 allows: a full 200 is
    always a correct answer. An If-Range that does not match our ETag means "the file changed, send all of it".
    Unsatisfiable (§14.1.1: a first byte at or past the end, or a zero-length suffix) raises UnsatisfiableRange.
    """
    if not header or size <= 0 or (if_range is not None and if_range.strip() != etag):
        return None
    match = _RANGE.fullmatch(header.strip())
    if not match or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":  # suffix: the last N bytes
        length = _position(last)
        if length == 0:
            raise UnsatisfiableRange()
        return max(size - length, 0), size
    start = _position(first)
    if last != "" and _less(last, first):
        return None
    if start >= size:
        raise UnsatisfiableRange()
    end = size if last == "" else min(_position(last) + 1, size)
    return start, end
