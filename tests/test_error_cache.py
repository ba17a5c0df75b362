"""api.resolution.ErrorCache: refusals and missing tags are remembered for a while, per identity, in bounded memory."""

from __future__ import annotations

import types

import pytest

from docker_http_passthrough.api import resolution
from docker_http_passthrough.api.resolution import ErrorCache
from docker_http_passthrough.shared.errors import NotFound

KEY = ("https://reg.example", "team/app", "v1", "anonymous")


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(resolution, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    return now


def test_an_error_is_remembered_for_its_seconds_then_forgotten(clock):
    cache = ErrorCache(10)
    missing = NotFound("no such tag")
    cache.put(KEY, missing)
    clock[0] += 9.9
    assert cache.get(KEY) is missing
    assert cache.get(KEY[:3] + ("someone-else",)) is None  # per identity
    clock[0] += 0.2
    assert cache.get(KEY) is None
    assert KEY not in cache.entries


def test_zero_seconds_remembers_nothing(clock):
    cache = ErrorCache(0)
    cache.put(KEY, NotFound("x"))
    assert cache.get(KEY) is None and not cache.entries


def test_a_flood_of_distinct_names_does_not_grow_it_without_bound(clock):
    cache = ErrorCache(1)
    for i in range(25_000):
        cache.put(("r", f"repo{i}", "t", "a"), NotFound("x"))
        clock[0] += 0.001  # each expires a second later: most are stale by the time the bound is hit
    assert len(cache.entries) <= 10_001
    assert cache.get(("r", "repo24999", "t", "a")) is not None
