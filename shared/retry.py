"""Bounded retries of upstream requests: exponential backoff with full jitter, and Retry-After honoured.

A transfer gets UPSTREAM_RETRIES further attempts after connection errors, cuts and the statuses a registry uses
for "try again" (408, 429, 5xx) — except a 429 that says the pull limit is used up (`ratelimit-remaining: 0`, as
Docker Hub's does): that lasts the rest of its window. A Retry-After (seconds or an HTTP date) is waited for exactly when it is at
most UPSTREAM_RETRY_AFTER_MAX; a longer one, or a wait that would end past the transfer's deadline, ends the
transfer at once: a device waiting for headers is better served by a clear error than by a silent wait.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time

import httpx

from docker_http_passthrough.shared.rate_limits import parse_quota

log = logging.getLogger("docker_http_passthrough.upstream")

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
BACKOFF_FIRST = 0.25  # seconds; doubles per attempt, up to BACKOFF_MAX, a random part of it is waited
BACKOFF_MAX = 8.0


def retry_after(response: httpx.Response | None, now: float | None = None) -> float | None:
    """Seconds the response asks to wait (`Retry-After: 5` or an HTTP date), or None."""
    value = response.headers.get("retry-after", "").strip() if response is not None else ""
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


class GiveUp(Exception):
    """No further attempt: the message says why (retries spent, Retry-After too long, deadline)."""


class Attempts:
    """The attempts of one transfer. `await attempts.pause(response)` before trying again: it waits the backoff
    or the Retry-After, or raises GiveUp."""

    def __init__(self, retries: int, deadline: float, retry_after_max: float):
        self.retries = retries
        self.deadline = deadline  # event-loop time
        self.retry_after_max = retry_after_max
        self.failed = 0

    def _backoff(self) -> float:
        return random.uniform(0, min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** self.failed))

    async def pause(self, response: httpx.Response | None, what: str) -> None:
        self.failed += 1
        if self.failed > self.retries:
            raise GiveUp(f"{what} ({self.failed} attempts, UPSTREAM_RETRIES={self.retries})")
        if response is not None and response.status_code == 429 and not retry_after(response) and \
                (remaining := parse_quota(response.headers.get("ratelimit-remaining"))) and not remaining.count:
            raise GiveUp(f"{what}: the registry's pull limit is used up (ratelimit-remaining 0) for its whole window")
        asked = retry_after(response)
        if asked is not None and asked > self.retry_after_max:
            raise GiveUp(f"{what} and asked to retry after {asked:.0f}s, longer than "
                         f"UPSTREAM_RETRY_AFTER_MAX={self.retry_after_max:g}s")
        wait = asked if asked is not None else self._backoff()
        if asyncio.get_running_loop().time() + wait >= self.deadline:
            raise GiveUp(f"{what}; no time left to retry before the transfer's deadline")
        log.info("%s; retrying in %.2fs (attempt %d of %d)", what, wait, self.failed + 1, self.retries + 1)
        await asyncio.sleep(wait)
