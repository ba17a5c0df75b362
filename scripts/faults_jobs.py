"""Job-side fault scenarios (issue 10, items 1-3 and 5): a worker SIGKILLed mid-job, the only worker killed, a
Redis restart and a Redis outage, a full store volume. Registered in faultlab.FAULTS on import."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx
import redis

from faultlab import Copy, Figures, Lab, after_stack, copies, copies_spread, extra_seconds, fault, in_background, \
    memory, wait_for
from tests.support.images import Layer
from tests.support.job_faults import fill, leftovers, rq_registered, running_job, small_volume, worker_of
from tests.support.service_fixtures import Stack

BIG = 64 << 20  # the cold image's big layer
THROTTLE = 16 << 20  # bytes/s from the registry: the big layer takes ~4 s, so a fault lands mid-layer
DEVICES = 5


def cold_run(lab: Lab, stack: Stack, during: Callable[[list[Layer]], None] | None = None) -> tuple[list[Copy], int]:
    """DEVICES devices download a fresh cold image (the registry throttled); ``during(layers)`` runs once half
    of its big layer came. Returns the copies and the upstream body bytes beyond the image's blobs."""
    filename, layers = lab.image_layers(BIG)
    proxy = lab.registry.proxy
    proxy.reset()
    proxy.throttle_bytes_per_second = THROTTLE
    try:
        pending = in_background(lambda: copies(stack.server, filename, DEVICES))
        if during is not None:
            wait_for(lambda: proxy.body_bytes(layers[-1].digest) > BIG // 2, timeout=120)
            during(layers)
        result = pending()
    finally:
        proxy.throttle_bytes_per_second = None
    return result, proxy.body_bytes("/blobs/") - sum(layer.size for layer in layers)


@fault("worker-killed", f"a worker SIGKILLed mid-job, another alive: {DEVICES} devices wait for a cold "
                        f"{BIG >> 20} MiB image (defaults: WORKER_LOST_TIMEOUT, PREPARE_GRACE)")
def worker_killed(lab: Lab) -> Figures:
    stack = lab.stack("two-tier", workers=2)
    watch = redis.Redis.from_url(stack.redis.url)
    baseline, baseline_extra = cold_run(lab, stack)
    killed: dict[str, float | str] = {}

    def kill(layers: list[Layer]) -> None:
        victim, killed["name"] = worker_of(watch, running_job(watch), stack.workers)
        gets = lab.registry.proxy.count("GET", kind="blob", path_contains=layers[-1].digest)
        victim.kill()
        killed["rerun after"] = wait_for(lambda: lab.registry.proxy.count(
            "GET", kind="blob", path_contains=layers[-1].digest) > gets, timeout=120)

    faulty, extra = cold_run(lab, stack, kill)
    buried = wait_for(lambda: killed["name"] not in rq_registered(watch), timeout=30)
    return after_stack(stack, {
        "devices, no fault": copies_spread(baseline),
        "devices, worker killed at half the big layer": copies_spread(faulty),
        "extra seconds": extra_seconds(baseline, faulty),
        "the rerun began after the kill": f"{killed['rerun after']:.1f} s",
        "extra upstream bytes (the layer in flight)": f"{extra - baseline_extra:,}",
        "dead worker out of RQ's registry after the rerun": "yes" if buried is not None else "no",
        "surviving worker memory now / peak": memory(stack.workers[0].pid if stack.workers[0].alive()
                                                         else stack.workers[1].pid),
    }, watch)


@fault("only-worker-killed", "the only worker SIGKILLed (idle), then a device asks for a cold image; a worker "
                             "starts after the 504")
def only_worker_killed(lab: Lab) -> Figures:
    stack = lab.stack("two-tier", workers=1)
    watch = redis.Redis.from_url(stack.redis.url)
    filename = lab.image(1 << 20)
    stack.workers[0].kill()
    [answer] = copies(stack.server, filename, 1)
    stack.add_worker()
    job_id = watch.keys("rq:job:*")[0].decode().removeprefix("rq:job:")
    done = wait_for(lambda: httpx.get(f"{stack.url}/status/{job_id}", trust_env=False).json().get("state") == "done",
                    timeout=60)
    [served] = copies(stack.server, filename, 1)
    buried = wait_for(lambda: len(rq_registered(watch)) == 1, timeout=30)
    return after_stack(stack, {
        "answer to the device": f"{answer.status} after {answer.seconds:.1f} s",
        "queued job done after a worker started": f"{done:.1f} s" if done is not None else "not within 60 s",
        "the next request": f"{served.status} in {served.seconds:.2f} s",
        "the dead worker out of RQ's registry": "yes" if buried is not None else "no",
    }, watch)


@fault("redis-blip", f"Redis restarted (same data, down 0.6 s) at half the big layer of a cold {BIG >> 20} MiB "
                     f"image, {DEVICES} devices waiting")
def redis_blip(lab: Lab) -> Figures:
    stack = lab.stack("two-tier", workers=2)
    baseline, baseline_extra = cold_run(lab, stack)
    down: list[float] = []
    faulty, extra = cold_run(lab, stack, lambda _layers: down.append(stack.redis.restart(down_for=0.6)))
    watch = redis.Redis.from_url(stack.redis.url)
    return after_stack(stack, {
        "Redis did not answer for": f"{down[0]:.2f} s",
        "devices, no fault": copies_spread(baseline),
        "devices, Redis restarted": copies_spread(faulty),
        "extra seconds": extra_seconds(baseline, faulty),
        "extra upstream bytes": f"{extra - baseline_extra:,}",
    }, watch)


@fault("redis-outage", "Redis down for 20 s (past REDIS_OUTAGE_TIMEOUT and WORKER_LOST_TIMEOUT, defaults): a "
                       "device asks for a cold image meanwhile, another once Redis is back")
def redis_outage(lab: Lab) -> Figures:
    stack = lab.stack("two-tier", workers=2)
    filename = lab.image(1 << 20)
    down: list[float] = []
    outage = threading.Thread(target=lambda: down.append(stack.redis.restart(down_for=20)))
    outage.start()
    time.sleep(0.5)
    [during] = copies(stack.server, filename, 1)
    outage.join()
    [after] = copies(stack.server, filename, 1)
    watch = redis.Redis.from_url(stack.redis.url)
    time.sleep(5)  # long enough for a survivor to bury a worker it wrongly took for dead
    return after_stack(stack, {
        "Redis did not answer for": f"{down[0]:.1f} s",
        "the device during the outage": f"{during.status} after {during.seconds:.1f} s",
        "a device once Redis is back": f"{after.status} in {after.seconds:.2f} s",
    }, watch)


def disk_full(lab: Lab, mode: str) -> Figures:
    with small_volume(lab.workdir / f"volume-{mode}", "64m") as volume:
        stack = lab.stack(mode, workers=1, cache_dir=volume / "cache")
        warm = lab.image(8 << 20)
        cold = lab.image(16 << 20)
        [first] = copies(stack.server, warm, 1)
        filler = fill(volume, leave_free=4 << 20)
        [full] = copies(stack.server, cold, 1)
        left = leftovers(stack.cache_dir)
        [served] = copies(stack.server, warm, 1)
        filler.unlink()
        [recovered] = copies(stack.server, cold, 1)
        figures = after_stack(stack, {
            "a warm image before": f"{first.status} in {first.seconds:.2f} s",
            "cold image on the full volume": f"{full.status} after {full.seconds:.2f} s",
            "left on disk right after the 507": "nothing" if not left else ", ".join(left[:4]),
            "warm image on the full volume": f"{served.status} in {served.seconds:.2f} s",
            "cold image once space is back": f"{recovered.status} in {recovered.seconds:.2f} s",
        })
        stack.stop()
    return figures


@fault("disk-full-embedded", "a 64 MiB store volume filled to 4 MiB free, embedded mode")
def disk_full_embedded(lab: Lab) -> Figures:
    return disk_full(lab, "embedded")


@fault("disk-full-two-tier", "a 64 MiB store volume filled to 4 MiB free, two-tier mode")
def disk_full_two_tier(lab: Lab) -> Figures:
    return disk_full(lab, "two-tier")


@fault("disk-full-evict", "a 64 MiB store volume with CACHE_MAX_BYTES=1G (above its size): a 24 MiB image, "
                          "the volume filled to 16 MiB free, then another 24 MiB image (two-tier)")
def disk_full_evict(lab: Lab) -> Figures:
    with small_volume(lab.workdir / "volume-evict", "64m") as volume:
        stack = lab.stack("two-tier", workers=1, cache_dir=volume / "cache", env={"CACHE_MAX_BYTES": "1G"})
        old = lab.image(24 << 20)
        new, layers = lab.image_layers(24 << 20, small_layers=0)
        copies(stack.server, old, 1)
        fill(volume, leave_free=16 << 20)
        lab.registry.proxy.reset()
        [answer] = copies(stack.server, new, 1)
        extra = lab.registry.proxy.body_bytes("/blobs/") - sum(layer.size for layer in layers)
        figures = after_stack(stack, {
            "the second image": f"{answer.status} in {answer.seconds:.2f} s",
            "layers left in the store": str(len(list((stack.cache_dir / "layers" / "sha256").glob("*.tar")))),
            "extra upstream bytes (the write that failed)": f"{extra:,}",
        })
        stack.stop()
    return figures
