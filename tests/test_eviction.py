"""Eviction: least-recently-used layers first (by our own use records, not atime), leased layers never; an API
process keeps one lease per layer in use, whatever the number of its downloads (LeaseBook)."""

from __future__ import annotations

import os
import time

import pytest

from docker_http_passthrough.api.lease_book import LeaseBook
from docker_http_passthrough.shared import eviction
from docker_http_passthrough.shared.eviction import evict, leased, record_use
from docker_http_passthrough.shared.store import Store
from tests.support.images import sha


def _layer(store: Store, content: bytes, used_seconds_ago: float | None) -> str:
    diff_id = sha(content)
    with store.atomic_writer(store.layer_path(diff_id)) as out:
        out.write(content)
    if used_seconds_ago is not None:
        record_use(store, [diff_id])
        when = time.time() - used_seconds_ago
        os.utime(store.root / "used" / diff_id.removeprefix("sha256:"), (when, when))
    return diff_id


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "cache")


def test_under_the_limit_nothing_goes(store):
    a = _layer(store, b"a" * 1000, 100)
    assert evict(store, 5000) == []
    assert evict(store, 0) == []  # 0: unbounded
    assert store.has_layer(a)


def test_least_recently_used_go_first_until_it_fits(store):
    old = _layer(store, b"o" * 1000, 300)
    middle = _layer(store, b"m" * 1000, 200)
    recent = _layer(store, b"r" * 1000, 10)
    removed = evict(store, 2000)
    assert removed == [old.removeprefix("sha256:")]
    assert not store.has_layer(old) and store.has_layer(middle) and store.has_layer(recent)
    record_use(store, [middle])  # now the most recent
    assert evict(store, 1000) == [recent.removeprefix("sha256:")]
    assert store.has_layer(middle)


def test_atime_is_not_trusted_our_use_record_is(store):
    read_often = _layer(store, b"x" * 1000, 500)
    fresh = _layer(store, b"y" * 1000, 5)
    path = store.layer_path(read_often)
    os.utime(path, (time.time(), os.stat(path).st_mtime))  # a reader bumped atime
    assert evict(store, 1000) == [read_often.removeprefix("sha256:")]
    assert store.has_layer(fresh)


def test_leased_layers_are_never_evicted(store):
    streaming = _layer(store, b"s" * 1000, 1000)
    other = _layer(store, b"t" * 1000, 10)
    with leased(store, [streaming]):
        removed = evict(store, 1000)
        assert removed == [other.removeprefix("sha256:")]
        assert store.has_layer(streaming)
        assert evict(store, 1) == []  # over the limit, but all that is left is leased
    assert evict(store, 1) == [streaming.removeprefix("sha256:")]  # lease released


def test_a_crashed_holders_lease_expires(store, monkeypatch):
    layer = _layer(store, b"c" * 1000, 1000)
    lease = eviction.Leases(store, [layer])
    lease.refresh(force=True)  # then the holder "crashes": never released, never refreshed
    stale = time.time() - eviction.LEASE_TTL - 5
    for path in lease.paths:
        os.utime(path, (stale, stale))
    assert evict(store, 1) == [layer.removeprefix("sha256:")]
    assert not any((store.root / "leases").iterdir())  # the dead lease was cleaned up


def test_partial_files_of_writers_are_not_counted_or_removed(store):
    _layer(store, b"k" * 1000, 10)
    partial = store.root / "layers" / "sha256" / "abc.tar.partial-123"
    partial.write_bytes(b"p" * 5000)
    assert evict(store, 2000) == []
    assert partial.exists()


@pytest.mark.anyio
async def test_a_process_holds_one_lease_per_layer_whatever_its_downloads(store):
    book = LeaseBook(store)
    one, two = _layer(store, b"one" * 100, None), _layer(store, b"two" * 100, None)
    leases = store.root / "leases"
    used = store.root / "used" / one.removeprefix("sha256:")
    async with book.hold([one, two]):
        assert len(list(leases.iterdir())) == 2 and used.exists()
        first_use = used.stat().st_mtime_ns
        async with book.hold([one]), book.hold([one, one]):
            assert len(list(leases.iterdir())) == 2  # no lease file per download
            assert evict(store, 1) == []  # both leased
        assert len(list(leases.iterdir())) == 2
    assert list(leases.iterdir()) == []
    assert used.stat().st_mtime_ns >= first_use  # the last use is when the last download ended
    assert sorted(evict(store, 1)) == sorted(d.removeprefix("sha256:") for d in (one, two))


def test_leases_carry_their_holders_token_and_a_dead_holders_go_at_once(store):
    layer = _layer(store, b"l" * 1000, 10)
    dead = Store(store.root, owner="dead0123")
    eviction.Leases(dead, [layer]).refresh(force=True)  # then SIGKILLed: never released
    with leased(store, [layer]) as mine:
        assert all(f".{store.owner}-" in path.name for path in mine.paths)
        assert eviction.remove_leases_of(store, "dead0123") == 1
        assert [p.name for p in (store.root / "leases").iterdir()] == [p.name for p in mine.paths]


def test_making_room_on_a_full_volume_frees_at_least_what_is_wanted(store):
    old = _layer(store, b"o" * 1000, 300)
    middle = _layer(store, b"m" * 1000, 200)
    recent = _layer(store, b"r" * 1000, 10)
    assert evict(store, 10**9) == []  # under CACHE_MAX_BYTES...
    assert evict(store, 10**9, free=1500) == [old.removeprefix("sha256:"), middle.removeprefix("sha256:")]
    assert store.has_layer(recent)
    assert evict(store, 0, free=1500) == [], "without CACHE_MAX_BYTES nothing is evicted"
