"""Docker Hub's pull limit, as its manifest responses announce it (`ratelimit-limit: 100;w=21600`,
`ratelimit-remaining: 76;w=21600`): a gauge per registry, a warning when few pulls are left (not one per
request), and a 429 that says the limit is used up."""

from __future__ import annotations

import logging

import httpx
import pytest
from prometheus_client import REGISTRY

from docker_http_passthrough.shared.errors import Unreachable
from docker_http_passthrough.shared.rate_limits import Quota, RateLimits, parse_quota
from docker_http_passthrough.shared.registry import RegistryClient
from docker_http_passthrough.shared.targets import RegistryTarget
from tests.support.fake_registry import REPO, sample_registry, target


def gauge(name: str, registry: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"registry": registry})


def limited(fake, remaining: list[int], status: int = 200) -> None:
    """Manifest answers carry Docker Hub's headers, `remaining` counting down one per answer."""
    def answer(request: httpx.Request) -> httpx.Response | None:
        if "/manifests/" not in request.url.path:
            return None
        response = fake.registry(request)
        left = remaining.pop(0)
        response.headers.update({"ratelimit-limit": "100;w=21600", "ratelimit-remaining": f"{left};w=21600",
                                 "docker-ratelimit-source": "203.0.113.7"})
        if status != 200:
            return httpx.Response(status, headers=response.headers)
        return response
    fake.override = answer


@pytest.mark.parametrize("value, quota", [
    ("100;w=21600", Quota(100, 21600)), ("76", Quota(76, None)), (" 5 ; w=60", Quota(5, 60)),
    ("100, 100;w=21600", Quota(100, None)), ("", None), ("none", None), (None, None)])
def test_quota_header_values(value, quota):
    assert parse_quota(value) == quota


@pytest.mark.anyio
async def test_remaining_pulls_become_a_gauge_and_one_warning_when_low(caplog):
    caplog.set_level(logging.WARNING, logger="docker_http_passthrough.registry")
    fake = sample_registry()
    limited(fake, [76, 12, 10, 9, 8])
    name = "ratelimited.example"
    async with fake.http() as registries:
        client = RegistryClient(registries, RegistryTarget("https://ratelimited.example", name), REPO)
        await client.head_manifest("v1")
        assert (gauge("dhp_registry_ratelimit_limit", name), gauge("dhp_registry_ratelimit_remaining", name)) == (
            100, 76)
        assert not caplog.records
        await client.head_manifest("v1")  # 12 left: not yet low
        assert not caplog.records
        for _ in range(3):  # 10, 9, 8: low; warned once, not once per request
            await client.head_manifest("v1")
    assert gauge("dhp_registry_ratelimit_remaining", name) == 8
    warning, = caplog.records
    assert warning.levelno == logging.WARNING
    assert "registry ratelimited.example: 10 pulls left of 100 per 6 h" in warning.getMessage()
    assert "203.0.113.7" not in warning.getMessage()


def test_warnings_come_back_after_a_minute():
    now = [0.0]
    limits = RateLimits(clock=lambda: now[0])
    headers = {"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "3;w=21600"}
    limits.observe("hub.example", headers)
    now[0] = 30
    limits.observe("hub.example", headers)
    assert list(limits.warned) == ["hub.example"] and limits.warned["hub.example"] == 0
    now[0] = 61
    limits.observe("hub.example", headers)
    assert limits.warned["hub.example"] == 61


@pytest.mark.anyio
async def test_a_429_says_the_limit_is_used_up():
    fake = sample_registry()
    limited(fake, [0], status=429)
    async with fake.http() as registries:
        with pytest.raises(Unreachable) as info:
            await RegistryClient(registries, target(), REPO).head_manifest("v1")
    assert info.value.code == "rate_limited"
    assert "HTTP 429, ratelimit-remaining 0 of 100 per 6 h" in info.value.message
    assert gauge("dhp_registry_ratelimit_remaining", "reg.example") == 0
