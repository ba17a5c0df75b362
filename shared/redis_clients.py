"""Redis clients that ride out a blip: every command retries with backoff for about REDIS_OUTAGE_TIMEOUT seconds
before its error reaches the caller, so a Redis restart or a cut connection costs time, not a failed request
or job. Every process (API, worker) makes its clients here.
"""

from __future__ import annotations

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from docker_http_passthrough.shared.settings import Settings

# The first retry waits BACKOFF_BASE * 2 seconds, doubling up to BACKOFF_CAP.
BACKOFF_BASE = 0.05
BACKOFF_CAP = 0.5
# A connection attempt to an unreachable host gives up after this long (and is retried).
CONNECT_TIMEOUT = 2.0


def retries_for(outage: float, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> int:
    """How many retries, with ExponentialBackoff(cap, base), wait at least `outage` seconds in total."""
    waited, retries = 0.0, 0
    while waited < outage:
        retries += 1
        waited += min(cap, base * 2 ** retries)
    return retries


def _options(settings: Settings) -> dict:
    return {
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_keepalive": True,
        # A connection idle this long is checked (PING) before use: one broken by a restart is replaced first.
        "health_check_interval": 15,
    }


def sync_client(settings: Settings, url: str | None = None) -> redis.Redis:
    retry = Retry(ExponentialBackoff(cap=BACKOFF_CAP, base=BACKOFF_BASE), retries_for(settings.redis_outage_timeout))
    return redis.Redis.from_url(url or settings.redis_url, retry=retry, **_options(settings))


def async_client(settings: Settings, url: str | None = None) -> aioredis.Redis:
    retry = AsyncRetry(ExponentialBackoff(cap=BACKOFF_CAP, base=BACKOFF_BASE),
                       retries_for(settings.redis_outage_timeout))
    return aioredis.Redis.from_url(url or settings.redis_url, retry=retry, **_options(settings))
