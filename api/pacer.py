"""Piece sizes that follow the client: big for fast ones (fewer hops, near disk speed), small for slow ones.

A fast client gets up to 4 MiB per send; a slow one (a switch at 1.4 MB/s) 64 KiB, so hundreds of slow
transfers hold little memory each — a piece waits in the socket buffer until the client has read it.
Zero-copy pieces (sendfile from the page cache) hold no memory of ours: they aim at a longer time per piece and
are never below 256 KiB, which spares a slow client's transfer most of the per-piece work.
"""

from __future__ import annotations

PIECE_MIN = 64 << 10
ZERO_COPY_PIECE_MIN = 256 << 10
PIECE_START = 128 << 10
PIECE_MAX = 4 << 20
# Aim for pieces a client drains in about this long (read into memory; sent with sendfile).
PIECE_SECONDS = 0.02
ZERO_COPY_PIECE_SECONDS = 0.25
# Socket buffers swallow the first megabytes at once, even for a slow client: trust the average rate only
# after this much, and stay at PIECE_START until then.
PIECE_TRUST_AFTER = 8 << 20


def piece_for(rate: float, seconds: float = PIECE_SECONDS, smallest: int = PIECE_MIN) -> int:
    """The piece a client reading `rate` bytes per second drains in about `seconds` (a power of two)."""
    size = smallest
    while size * 2 <= rate * seconds and size < PIECE_MAX:
        size *= 2
    return size


class PiecePacer:
    def __init__(self, now: float, zero_copy: bool = False):
        self.started = now
        self.total = 0
        self.seconds = ZERO_COPY_PIECE_SECONDS if zero_copy else PIECE_SECONDS
        self.smallest = ZERO_COPY_PIECE_MIN if zero_copy else PIECE_MIN
        self.first = max(PIECE_START, self.smallest)
        self.piece = self.first

    def waited(self, seconds: float) -> None:
        """The stream had nothing to send for this long (an early start waiting for a layer): not the client's
        slowness, so it does not count against its average rate."""
        self.started += seconds

    def sent(self, size: int, began: float, ended: float) -> None:
        """A piece of `size` bytes took from `began` to `ended` to go out; sets the next piece size."""
        self.total += size
        this_send = piece_for(size / max(ended - began, 1e-6), self.seconds, self.smallest)
        overall = piece_for(self.total / max(ended - self.started, 1e-6), self.seconds, self.smallest)
        self.piece = min(this_send, overall if self.total >= PIECE_TRUST_AFTER else self.first)
