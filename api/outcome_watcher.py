"""Waking the requests that wait on a job as soon as its outcome is published: one pattern subscription per API
process on the outcome channels, no thread or connection per waiter."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import redis.asyncio as aioredis

from docker_http_passthrough.shared.jobs import OUTCOME_PATTERN, OUTCOME_PREFIX

log = logging.getLogger("docker_http_passthrough.api")
# While the subscription is down, waiters still look at their job every so often (see queue_preparer).
RECONNECT_AFTER = 1.0


class OutcomeWatcher:
    """One pattern subscription per process; wakes the waiters of a job when its outcome is published."""

    def __init__(self, client: aioredis.Redis, on_outcome: Callable[[str], None] = lambda job_id: None):
        self.client = client
        self.on_outcome = on_outcome  # called with the job id before its waiters wake
        self.waiters: dict[str, set[asyncio.Event]] = {}  # by job id
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        while True:
            try:
                # The client's retries reconnect and resubscribe through a blip; past them, a fresh subscription.
                async with self.client.pubsub() as pubsub:
                    await pubsub.psubscribe(OUTCOME_PATTERN)
                    async for message in pubsub.listen():
                        if message.get("type") == "pmessage":
                            job_id = message["channel"].decode().removeprefix(OUTCOME_PREFIX)
                            self.on_outcome(job_id)
                            for event in self.waiters.get(job_id, ()):
                                event.set()
            except asyncio.CancelledError:
                raise
            except Exception:  # waiters fall back to looking every CHECK_EVERY meanwhile
                log.warning("outcome subscription lost; reconnecting", exc_info=True)
                await asyncio.sleep(RECONNECT_AFTER)

    async def wait(self, job_id: str, timeout: float) -> None:
        """Until the job's outcome is published, or `timeout` seconds."""
        event = asyncio.Event()
        self.waiters.setdefault(job_id, set()).add(event)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self.waiters[job_id].discard(event)
            if not self.waiters[job_id]:
                del self.waiters[job_id]

    async def close(self) -> None:
        if self.task:
            self.task.cancel()
