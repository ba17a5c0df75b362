"""Pull limits registries announce (Docker Hub: `ratelimit-limit: 100;w=21600`, `ratelimit-remaining: 76;w=21600`
on manifest responses, HEAD included), so operators see the limit coming before requests start failing with 429:
a gauge per registry, and a warning in the log when few pulls are left (at most one a minute per registry)."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

from docker_http_passthrough.shared.metrics import RATELIMIT_LIMIT, RATELIMIT_REMAINING

log = logging.getLogger("docker_http_passthrough.registry")

# Warn when at most this share of the window's pulls is left, or this many, whichever is more.
WARN_SHARE = 0.1
WARN_AT_LEAST = 10
WARN_EVERY = 60.0
_QUOTA_RE = re.compile(r"\s*(\d+)\s*(?:;\s*w\s*=\s*(\d+))?")


@dataclass(frozen=True)
class Quota:
    count: int
    window: int | None  # seconds, when the registry says

    def __str__(self) -> str:
        if self.window is None:
            return str(self.count)
        hours = self.window / 3600
        return f"{self.count} per {hours:g} h" if hours >= 1 else f"{self.count} per {self.window} s"


def parse_quota(value: str | None) -> Quota | None:
    """`100;w=21600` → Quota(100, 21600); the first entry of a list; None when absent or unreadable."""
    match = _QUOTA_RE.match(value or "")
    if not match:
        return None
    return Quota(int(match.group(1)), int(match.group(2)) if match.group(2) else None)


def describe(headers: Mapping[str, str]) -> str:
    """For error messages: `ratelimit-remaining 0 of 100 per 6 h`, or "" when the registry said nothing."""
    limit, remaining = parse_quota(headers.get("ratelimit-limit")), parse_quota(headers.get("ratelimit-remaining"))
    if remaining is None:
        return ""
    return f"ratelimit-remaining {remaining.count}" + (f" of {limit}" if limit else "")


class RateLimits:
    """What registries said about their pull limits, in one process; owned by `Registries`."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.warned: dict[str, float] = {}  # registry → when we last warned

    def observe(self, registry: str, headers: Mapping[str, str]) -> None:
        limit, remaining = parse_quota(headers.get("ratelimit-limit")), parse_quota(headers.get("ratelimit-remaining"))
        if limit is not None:
            RATELIMIT_LIMIT.labels(registry).set(limit.count)
        if remaining is None:
            return
        RATELIMIT_REMAINING.labels(registry).set(remaining.count)
        low = max(WARN_AT_LEAST, (limit.count if limit else 0) * WARN_SHARE)
        if remaining.count > low:
            return
        now = self.clock()
        if now - self.warned.get(registry, -WARN_EVERY) < WARN_EVERY:
            return
        self.warned[registry] = now
        log.warning("registry %s: %d pulls left%s (ratelimit-remaining); at 0 it answers 429 until the window "
                    "ends: pre-warm images, give the server registry credentials, or use a mirror", registry,
                    remaining.count, f" of {limit}" if limit else "")
