"""Request limits, per API process: downloads in progress per client address, and cold images in flight.

Past either cap the answer is 429 with Retry-After. Both are generous by default, because a whole site of
switches behind one NAT (or every client behind a reverse proxy that uvicorn is not told to trust through
FORWARDED_ALLOW_IPS) shows as one address, and a rollout asks for a handful of images, not dozens.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from docker_http_passthrough.api.http_errors import json_error
from docker_http_passthrough.shared.errors import TooManyRequests
from docker_http_passthrough.shared.jobs import job_id_for
from docker_http_passthrough.shared.store import Store

log = logging.getLogger("docker_http_passthrough.api")

# A download takes minutes: ask a refused client to come back in a while, not at once.
DOWNLOADS_RETRY_AFTER = 30
# A preparation takes seconds to minutes; a slot frees when one ends.
COLD_RETRY_AFTER = 30


class ClientDownloads:
    """Requests in progress on the download routes, per client address (responses streaming included)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.counts: dict[str, int] = {}

    def enter(self, address: str) -> bool:
        count = self.counts.get(address, 0)
        if self.limit and count >= self.limit:
            return False
        self.counts[address] = count + 1
        return True

    def leave(self, address: str) -> None:
        count = self.counts.pop(address, 1) - 1
        if count > 0:
            self.counts[address] = count


class PerClientDownloads:
    """Route middleware on the download routes: the count lasts until the last byte went out."""

    def __init__(self, app: ASGIApp, downloads: ClientDownloads):
        self.app = app
        self.downloads = downloads

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        address = (scope.get("client") or ("unknown",))[0]
        if not self.downloads.enter(address):
            limit = self.downloads.limit
            log.info("refused a download for %s: %d in progress (MAX_DOWNLOADS_PER_CLIENT)", address, limit)
            error = TooManyRequests(f"this client address already has {limit} downloads in progress "
                                    f"(MAX_DOWNLOADS_PER_CLIENT={limit}); retry in {DOWNLOADS_RETRY_AFTER} s",
                                    retry_after=DOWNLOADS_RETRY_AFTER, code="too_many_downloads")
            await json_error(error.status, error.code, error.message, error.headers())(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.downloads.leave(address)


class ColdImages:
    """Distinct images whose preparation this process started and that are not done: a client naming image after
    image (any registry, any tag) must not start unbounded work. Asking for one already in flight always joins."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight: dict[str, str] = {}  # image key → job id

    async def admit(self, key: str, store: Store, preparer: Any) -> None:
        """Before starting the preparation of `key`; raises TooManyRequests past MAX_COLD_IMAGES."""
        if not self.limit or key in self.in_flight:
            return
        if len(self.in_flight) >= self.limit:
            await self._forget_finished(store, preparer)
        if len(self.in_flight) >= self.limit and not await self._running_anyway(job_id_for(key), preparer):
            raise TooManyRequests(f"{len(self.in_flight)} other images are being prepared (MAX_COLD_IMAGES="
                                  f"{self.limit}); retry in {COLD_RETRY_AFTER} s", retry_after=COLD_RETRY_AFTER,
                                  code="too_many_cold_images")
        self.in_flight[key] = job_id_for(key)

    async def _forget_finished(self, store: Store, preparer: Any) -> None:
        for key, job_id in list(self.in_flight.items()):
            if store.get_image(key) is not None:
                del self.in_flight[key]
                continue
            try:
                ended = (await preparer.state(job_id)).ended
            except Exception:  # Redis away: keep counting it, the next look may tell
                continue
            if ended:
                self.in_flight.pop(key, None)

    @staticmethod
    async def _running_anyway(job_id: str, preparer: Any) -> bool:
        """Started by another API process (two-tier): joining it costs nothing more."""
        try:
            return not (await preparer.state(job_id)).ended
        except Exception:
            return False
