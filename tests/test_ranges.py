"""api.ranges: which bytes a Range header asks for (one range, RFC 9110), and when the answer is the whole file."""

from __future__ import annotations

import pytest

from docker_http_passthrough.api.ranges import UnsatisfiableRange, requested_range

ETAG = '"abc"'
SIZE = 1000


@pytest.mark.parametrize(("header", "expected"), [
    ("bytes=0-0", (0, 1)),
    ("bytes=0-999", (0, 1000)),
    ("bytes=100-199", (100, 200)),
    ("bytes=100-", (100, 1000)),
    ("bytes=999-", (999, 1000)),
    ("bytes=500-5000", (500, 1000)),  # the end is clipped to the size
    ("bytes=-10", (990, 1000)),  # the last 10 bytes
    ("bytes=-5000", (0, 1000)),  # a suffix longer than the file is all of it
    (" bytes=1-2 ", (1, 3)),
])
def test_single_ranges(header, expected):
    assert requested_range(header, None, ETAG, SIZE) == expected


@pytest.mark.parametrize("header", [None, "", "bytes=-", "bytes=1-2,5-6", "items=1-2", "bytes=a-b", "bytes 1-2",
                                    "bytes=5-4", "bytes=\u0663-"])
def test_anything_else_is_the_whole_archive(header):
    """Malformed, invalid (last before first, RFC 9110 §14.1.1) and multi-range headers are ignored, as §14.2
    allows: a full 200 is always a correct answer. Only ASCII digits are digits."""
    assert requested_range(header, None, ETAG, SIZE) is None


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=1000-2000", "bytes=-0"])
def test_unsatisfiable(header):
    with pytest.raises(UnsatisfiableRange):
        requested_range(header, None, ETAG, SIZE)


def test_if_range_must_match_the_etag():
    assert requested_range("bytes=10-", ETAG, ETAG, SIZE) == (10, 1000)
    assert requested_range("bytes=10-", f" {ETAG} ", ETAG, SIZE) == (10, 1000)
    # The file changed (or a weak or other validator): send all of it.
    assert requested_range("bytes=10-", '"other"', ETAG, SIZE) is None
    assert requested_range("bytes=10-", f"W/{ETAG}", ETAG, SIZE) is None
