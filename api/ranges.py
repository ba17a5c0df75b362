"""Single byte ranges (RFC 9110) for resuming a download; the archive is assembled on the fly, so we do it."""

from __future__ import annotations

import re

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class UnsatisfiableRange(Exception):
    pass


def requested_range(header: str | None, if_range: str | None, etag: str, size: int) -> tuple[int, int] | None:
    """The [start, end) a request asks for, or None for the whole archive.

    Multi-range and malformed headers are ignored (a full 200 is always a correct answer); an If-Range that
    does not match our ETag means "the file changed, send all of it".
    """
    if not header or (if_range is not None and if_range.strip() != etag):
        return None
    match = _RANGE.match(header.strip())
    if not match or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":  # suffix: the last N bytes
        length = int(last)
        if length == 0:
            raise UnsatisfiableRange()
        return max(size - length, 0), size
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if start >= size or end <= start:
        raise UnsatisfiableRange()
    return start, end
