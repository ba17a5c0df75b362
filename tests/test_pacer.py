"""api.pacer: piece sizes follow each client's rate, within bounds, trusting the average only after the socket
buffers had their fill."""

from __future__ import annotations

import pytest

from docker_http_passthrough.api.pacer import (
    PIECE_MAX,
    PIECE_MIN,
    PIECE_SECONDS,
    PIECE_START,
    PIECE_TRUST_AFTER,
    ZERO_COPY_PIECE_MIN,
    PiecePacer,
    piece_for,
)


@pytest.mark.parametrize("rate", [0, 1, 1_400_000, 10e6, 50e6, 200e6, 3e9, float("inf")])
def test_piece_for_is_a_bounded_power_of_two_a_client_drains_in_time(rate):
    size = piece_for(rate)
    assert PIECE_MIN <= size <= PIECE_MAX and size & (size - 1) == 0
    assert size == PIECE_MIN or size <= rate * PIECE_SECONDS  # never bigger than it drains in PIECE_SECONDS
    assert size == PIECE_MAX or size * 2 > rate * PIECE_SECONDS  # and the biggest that does


def simulate(rate: float, total: int, zero_copy: bool = False) -> list[int]:
    """Pieces a pacer picks for a client that reads `rate` bytes per second, until `total` bytes went out."""
    pacer, now, pieces = PiecePacer(0.0, zero_copy), 0.0, []
    while pacer.total < total:
        piece = pacer.piece
        pieces.append(piece)
        pacer.sent(piece, now, now + piece / rate)
        now += piece / rate
    return pieces


def test_a_switch_gets_small_pieces():
    pieces = simulate(1_400_000, 20 << 20)  # a Catalyst's copy: ~1.4 MB/s
    assert pieces[0] == PIECE_START
    assert set(pieces) <= {PIECE_MIN, PIECE_START} and pieces[-1] == PIECE_MIN


def test_a_fast_client_gets_big_pieces_once_its_average_is_trusted():
    pieces = simulate(2e9, 64 << 20)
    trusted_at = next(i for i in range(len(pieces)) if sum(pieces[:i]) >= PIECE_TRUST_AFTER)
    assert set(pieces[:trusted_at]) == {PIECE_START}, "the first megabytes only fill socket buffers"
    assert pieces[-1] == PIECE_MAX


def test_a_client_that_slows_down_gets_smaller_pieces_at_once():
    pacer = PiecePacer(0.0)
    pacer.sent(PIECE_TRUST_AFTER, 0.0, 0.01)  # fast so far
    assert pacer.piece == PIECE_MAX
    pacer.sent(PIECE_MAX, 1.0, 4.0)  # this send crawled
    assert pacer.piece == PIECE_MIN


def test_time_spent_waiting_for_the_preparation_is_not_the_clients_slowness():
    pacer = PiecePacer(0.0)
    pacer.sent(PIECE_TRUST_AFTER // 2, 0.0, 0.005)
    pacer.waited(30.0)  # an early-start stream held back until the next layer verified
    pacer.sent(PIECE_TRUST_AFTER // 2, 30.005, 30.01)
    assert pacer.piece == PIECE_MAX


def test_zero_copy_pieces_are_bigger_for_the_same_switch():
    """sendfile holds nothing of ours in memory: a switch's piece is a quarter second of its reading, not 64 KiB."""
    pieces = simulate(1_400_000, 20 << 20, zero_copy=True)
    assert min(pieces) >= ZERO_COPY_PIECE_MIN and pieces[-1] == ZERO_COPY_PIECE_MIN
    assert simulate(2e9, 64 << 20, zero_copy=True)[-1] == PIECE_MAX
