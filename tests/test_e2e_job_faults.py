"""End to end, the job side of a rollout under faults (issue 10, items 1-3): a worker SIGKILLed mid-job while
another is alive, the only worker SIGKILLed, Redis restarted mid-job. Real registry behind the counting,
throttling proxy, real redis-server, real RQ workers and server processes.

What must hold: the waiting requests get a correct archive (or, with no worker at all, a JSON 504 after
WORKER_LOST_TIMEOUT, never a hang); a lost job runs again at once, reusing every layer already stored; a Redis
blip costs time, not a failure; and nothing is left behind — no temp or lease file, no per-job Redis key, no
dead worker in RQ's registry.
"""

from __future__ import annotations

import hashlib
import os
import time

import pytest
import redis

from docker_http_passthrough.shared.gzip_tail import TAIL_WINDOW
from docker_http_passthrough.shared.job_queue import LOSS_CONFIRMED_AFTER
from docker_http_passthrough.shared.presence import SILENT_AFTER
from tests.support.downloads import get, image_url
from tests.support.faults import BackgroundGet, BackgroundStream, assert_complete_tar, assert_json_error, wait_until
from tests.support.images import make_layer
from tests.support.job_faults import files_of, leftovers, rq_registered, running_job, worker_of

pytestmark = pytest.mark.e2e

LOST = 3  # WORKER_LOST_TIMEOUT for these tests: short, so death is noticed within seconds


def slow_image(registry, repository: str, big: int = 1_500_000):
    """Two small layers that download at once, then a big one that takes seconds behind a throttled proxy."""
    layers = [make_layer({"a.txt": b"first"}), make_layer({"b.txt": b"second"}),
              make_layer({"big.bin": os.urandom(big)})]  # random: gzip keeps it big
    registry.push_image(repository, "v1", layers)
    return layers


def assert_nothing_left(running, watch: redis.Redis) -> None:
    """No temp or lease file, no per-job Redis key (a job's bookkeeping may end just after its archive did)."""
    assert wait_until(lambda: not leftovers(running.cache_dir, watch), timeout=5), leftovers(running.cache_dir, watch)


def test_a_worker_killed_mid_job_reruns_on_the_live_worker_and_every_waiter_gets_the_archive(
        stack, registry, unique_repo):
    proxy = registry.proxy
    small_a, small_b, big = slow_image(registry, unique_repo)
    running = stack("two-tier", workers=2, env={"WORKER_LOST_TIMEOUT": str(LOST), "PREPARE_GRACE": "1",
                                                 "LAYER_CONCURRENCY": "1"})
    url = image_url(running.url, registry.host, unique_repo, "v1")
    watch = redis.Redis.from_url(running.redis.url)
    proxy.throttle_bytes_per_second = 150_000  # ~10 s for the big layer
    try:
        stream = BackgroundStream(url, timeout=90)  # headers after PREPARE_GRACE: an early-start stream
        assert wait_until(lambda: proxy.body_bytes(big.digest) > 100_000, timeout=20), "the big layer never started"
        head = BackgroundGet(url, timeout=90, method="HEAD")  # a plain waiting request: HEAD never starts early
        job_id = running_job(watch)
        victim, dead = worker_of(watch, job_id, running.workers)
        assert files_of(running.cache_dir, dead), "the big layer is being written under the worker's token"
        assert wait_until(lambda: stream.headers_at is not None, timeout=10), "no early response"
        victim.kill()  # SIGKILL: no cleanup of its own
        killed_at = time.monotonic()
        proxy.throttle_bytes_per_second = None

        stream.join(timeout=LOST + 40)
        assert stream.status == 200 and stream.error is None, (stream.status, stream.error, running.logs()[-3000:])
        assert stream.received == int(stream.headers["content-length"])
        answered = head.join(timeout=30)
        assert answered.status == 200 and answered.headers["content-length"] == stream.headers["content-length"]
        took = stream.ended_at - killed_at
        warm = get(url)
        assert_complete_tar(warm)
        assert stream.sha256.digest() == hashlib.sha256(warm.body).digest(), "the early stream's bytes are the archive"

        # The rerun fetched only the layer in flight: the small layers once, the big one twice, the first time
        # cut short by the kill (the early stream's size probe, the blob's last TAIL_WINDOW bytes at most, aside).
        assert all(layer.size <= proxy.body_bytes(layer.digest) <= layer.size + TAIL_WINDOW for layer in (small_a, small_b))
        assert big.size + TAIL_WINDOW < proxy.body_bytes(big.digest) < 2 * big.size + TAIL_WINDOW
        # The survivor buried the dead worker: its files, its registration, our keys.
        assert wait_until(lambda: not files_of(running.cache_dir, dead) and dead not in rq_registered(watch),
                          timeout=LOST + LOSS_CONFIRMED_AFTER + 5), (files_of(running.cache_dir, dead),
                                                                       rq_registered(watch))
        assert_nothing_left(running, watch)
        assert not watch.sismember("dhp:workers", dead)
    finally:
        watch.close()
    # Death noticed after WORKER_LOST_TIMEOUT, confirmed for LOSS_CONFIRMED_AFTER; then the layer in flight again.
    assert took <= LOST + LOSS_CONFIRMED_AFTER + 10, f"the archive came {took:.1f}s after the kill"


@pytest.mark.parametrize("how", ["killed", "never started"])
def test_with_no_live_worker_a_cold_image_is_504_and_a_worker_started_later_prepares_it(
        stack, registry, unique_repo, how):
    """The README's promise: a 504 after WORKER_LOST_TIMEOUT, never a hang — also when the only worker was
    SIGKILLed and its RQ registration lingers; the job stays queued for the next worker."""
    layer = make_layer({"w.txt": b"waiting"})
    registry.push_image(unique_repo, "v1", [layer])
    running = stack("two-tier", workers=1 if how == "killed" else 0, env={"WORKER_LOST_TIMEOUT": "2"})
    if how == "killed":
        running.workers[0].kill()
    url = image_url(running.url, registry.host, unique_repo, "v1")

    started = time.monotonic()
    result = get(url, timeout=60)
    took = time.monotonic() - started
    assert_json_error(result, 504, error="no_worker", words=("no preparation worker is running",))
    # A worker counts as running until it has been silent for SILENT_AFTER seconds.
    assert took < SILENT_AFTER + 2 + 4, f"answered after {took:.1f}s"

    watch = redis.Redis.from_url(running.redis.url)
    try:
        job_id = watch.keys("rq:job:*")[0].decode().removeprefix("rq:job:")
        assert watch.hget(f"rq:job:{job_id}", "status") == b"queued", "it waits for a worker"
        running.add_worker()
        # The queued job runs on the new worker by itself: no further request is needed.
        assert wait_until(lambda: get(f"{running.url}/status/{job_id}").json()["state"] == "done", timeout=30)
        if how == "killed":  # the new worker buries the dead one (once it has seen it dead for a moment)
            assert wait_until(lambda: len(rq_registered(watch)) == 1, timeout=10), rq_registered(watch)
        assert_nothing_left(running, watch)
    finally:
        watch.close()
    served = get(url, timeout=30)
    assert_complete_tar(served)


def test_a_redis_restart_mid_job_costs_seconds_not_a_failure(stack, registry, unique_repo):
    """Redis stops (saving its data) and is back on the same port 0.6 s later, while a job downloads and
    requests wait: the job, the waiters, the outcome subscription and the workers' registrations go on."""
    proxy = registry.proxy
    small_a, small_b, big = slow_image(registry, unique_repo)
    other = make_layer({"after.txt": b"after the blip"})
    registry.push_image(unique_repo, "v2", [other])
    running = stack("two-tier", workers=2, env={"PREPARE_GRACE": "1"})
    url = image_url(running.url, registry.host, unique_repo, "v1")
    watch = redis.Redis.from_url(running.redis.url)
    proxy.throttle_bytes_per_second = 300_000  # ~5 s for the big layer
    try:
        stream = BackgroundStream(url, timeout=90)
        head = BackgroundGet(url, timeout=90, method="HEAD")
        assert wait_until(lambda: proxy.body_bytes(big.digest) > 200_000, timeout=20), "the big layer never started"
        down = running.redis.restart(down_for=0.6)
        proxy.throttle_bytes_per_second = None

        stream.join(timeout=60)
        assert stream.status == 200 and stream.error is None, (stream.status, stream.error, running.logs()[-3000:])
        assert stream.received == int(stream.headers["content-length"])
        assert head.join(timeout=30).status == 200
        assert big.size <= proxy.body_bytes(big.digest) <= big.size + TAIL_WINDOW, "one download (and a size probe): no rerun"
        # Both workers are still registered and beating, and take new jobs.
        assert wait_until(lambda: len(rq_registered(watch)) == 2, timeout=5), rq_registered(watch)
        assert len(watch.smembers("dhp:workers")) == 2
        assert_complete_tar(get(image_url(running.url, registry.host, unique_repo, "v2"), timeout=30))
        assert_nothing_left(running, watch)
    finally:
        watch.close()
    assert down < 5, f"Redis was down {down:.1f}s, not a blip"
