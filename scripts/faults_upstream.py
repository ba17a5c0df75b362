"""Fault scenarios of the registry side (issue 10, items 4 and 7), registered into scripts/faults.py's table.

Run them with the others: `.venv/bin/python scripts/faults.py --only registry-cut rate-limited hostile-manifest
hostile-layers hostile-drip`. Each compares against the same download without the fault where that makes sense,
and reads what crossed the wire from the counting proxy (or the rogue registry's own count).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time

import httpx

from faultlab import Figures, Lab, after_run, devices, fault, health_seconds
from tests.support.images import DOCKER_CONFIG, DOCKER_LAYER_GZIP, DOCKER_MANIFEST, make_config, make_layer, sha
from tests.support.rawhttp import memory_kib
from tests.support.rogue_registry import Answer, Drip, Huge, RogueRegistry

MiB = 1 << 20


def _pushed(lab: Lab, size: int) -> tuple[str, str, int]:
    """An image with one incompressible layer of ``size`` bytes: (filename, layer digest, blob size)."""
    repository = f"faults/upstream{time.monotonic_ns()}"
    layer = make_layer({"payload.bin": os.urandom(size)})
    lab.registry.push_image(repository, "v1", [layer])
    return f"{repository.replace('/', '__')}_v1.tar", layer.digest, layer.size


def _timed_get(url: str, timeout: float = 300) -> tuple[int, float, dict]:
    started = time.monotonic()
    with httpx.Client(timeout=timeout, trust_env=False) as client:
        response = client.get(url)
    body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
    return response.status_code, time.monotonic() - started, body


@fault("registry-cut", "the registry connection cut after 64 MiB of a 256 MiB blob (embedded, cold)")
def registry_cut(lab: Lab) -> Figures:
    filename, digest, size = _pushed(lab, 256 * MiB)
    proxy = lab.registry.proxy
    proxy.reset()
    baseline = devices(lab.server({}), filename, 1)[0]
    clean_bytes = proxy.body_bytes(digest)
    proxy.reset()
    proxy.cut(digest, after_bytes=64 * MiB)
    server = lab.server({})
    cut = devices(server, filename, 1)[0]
    statuses = [r.status for r in proxy.requests if digest in r.path]
    figures = {
        "cold download, no fault / with the cut": f"{baseline:.2f} s / {cut:.2f} s",
        "extra seconds for the device": f"{cut - baseline:+.2f} s",
        "blob requests (status)": ", ".join(map(str, statuses)),
        "upstream blob bytes: clean run / with the cut": f"{clean_bytes:,} / {proxy.body_bytes(digest):,}",
        "extra upstream bytes": f"{proxy.body_bytes(digest) - size:,}",
    }
    proxy.reset()
    return after_run(server, figures)


@fault("rate-limited", "429 with Retry-After: 2 on the tag, 503 with Retry-After: 1 twice on the blob; then a "
                       "Retry-After: 3600")
def rate_limited(lab: Lab) -> Figures:
    filename, digest, _size = _pushed(lab, 4 * MiB)
    cold, _digest, _size = _pushed(lab, 1000)
    proxy = lab.registry.proxy
    server = lab.server({})
    url = f"{server.url}/docker/{filename}"
    proxy.reset()
    proxy.fail(f"{filename.split('_v1')[0].replace('__', '/')}/manifests/v1", 429, headers={"Retry-After": "2"})
    proxy.fail(digest, 503, times=2, headers={"Retry-After": "1"})
    status, waited, _ = _timed_get(url)
    warm_status, warm, _ = _timed_get(url)
    proxy.reset()
    proxy.fail("/manifests/v1", 429, times=10, headers={"Retry-After": "3600"})
    refused, refused_after, body = _timed_get(f"{server.url}/docker/{cold}")
    figures = {
        "download through 429 + 2 x 503": f"{status} in {waited:.2f} s (warm, no fault: {warm_status} in {warm:.2f} s)",
        "extra seconds (Retry-After asked 2 + 1 + 1)": f"{waited - warm:+.2f} s",
        "a cold image behind Retry-After: 3600": f"{refused} {body.get('error')} in {refused_after:.2f} s",
        "upstream requests for its tag": str(proxy.count(path_contains="/manifests/v1")),
    }
    proxy.reset()
    return after_run(server, figures)


def _rogue_manifest(layers: list[dict], config: bytes) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "layers": layers,
                       "config": {"mediaType": DOCKER_CONFIG, "digest": sha(config), "size": len(config)}}).encode()


def _health_while(server, busy: concurrent.futures.Future) -> tuple[int, float]:
    """(probes answered, slowest seconds) of /health asked every 50 ms while ``busy`` runs."""
    answered, slowest = 0, 0.0
    while not busy.done():
        status, seconds = health_seconds(server)
        answered += status == 200
        slowest = max(slowest, seconds)
        time.sleep(0.05)
    return answered, slowest


@fault("hostile-manifest", "a registry answering a 200 MiB manifest (chunked, no size up front)")
def hostile_manifest(lab: Lab) -> Figures:
    config = make_config([])
    server = lab.server({})
    before = memory_kib(server.pid)[1]
    with RogueRegistry("evil/app", "v1", _rogue_manifest([], config), DOCKER_MANIFEST, {}) as rogue:
        rogue.answers[rogue.manifest_path()] = Answer(200, {"Content-Type": DOCKER_MANIFEST}, Huge(200 * MiB))
        url = f"{server.url}/registry/http/{rogue.host}/docker/evil__app_v1.tar"
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            busy = pool.submit(_timed_get, url)
            answered, slowest = _health_while(server, busy)
            status, seconds, body = busy.result()
        sent = max((s.sent for s in rogue.served if s.method == "GET"), default=0)
    return after_run(server, {
        "answer": f"{status} {body.get('error')} in {seconds:.2f} s: {body.get('message', '')[:90]}",
        "bytes the registry got to send": f"{sent:,} of {200 * MiB:,}",
        "server peak memory before / after": f"{before // 1024} MiB / {memory_kib(server.pid)[1] // 1024} MiB",
        "/health during it": f"{answered} answered, slowest {slowest * 1000:.0f} ms",
    })


@fault("hostile-layers", "a registry answering a manifest of 10,000 layers")
def hostile_layers(lab: Lab) -> Figures:
    config = make_config([])
    layers = [{"mediaType": DOCKER_LAYER_GZIP, "digest": f"sha256:{i:064x}", "size": 1000} for i in range(10_000)]
    server = lab.server({})
    with RogueRegistry("evil/app", "v1", _rogue_manifest(layers, config), DOCKER_MANIFEST,
                       {sha(config): config}) as rogue:
        status, seconds, body = _timed_get(f"{server.url}/registry/http/{rogue.host}/docker/evil__app_v1.tar")
        asked = len(rogue.requests)
    return after_run(server, {
        "answer": f"{status} {body.get('error')} in {seconds:.2f} s: {body.get('message', '')[:90]}",
        "requests the registry got": str(asked),
    })


@fault("hostile-drip", "a config blob dripping 1 byte every 2 s: a device that waits, one that leaves after 5 s")
def hostile_drip(lab: Lab) -> Figures:
    config = make_config([])
    server = lab.server({})
    figures: Figures = {}
    with RogueRegistry("evil/app", "v1", _rogue_manifest([], config), DOCKER_MANIFEST, {}) as rogue:
        rogue.answers[rogue.blob_path(sha(config))] = Answer(200, {}, Drip(config, every=2.0))
        url = f"{server.url}/registry/http/{rogue.host}/docker/evil__app_v1.tar"
        status, seconds, body = _timed_get(url)
        drip = [s for s in rogue.served if "/blobs/" in s.path][-1]
        figures["a device that waits"] = f"{status} {body.get('error')} after {seconds:.1f} s"
        _wait_closed(drip, 5)  # the rogue notices a close at its next byte, up to 2 s later
        figures["upstream connection closed after"] = _closed(drip)
        started = time.monotonic()
        try:
            _timed_get(url, timeout=5)
        except httpx.TimeoutException:
            pass
        leaving = [s for s in rogue.served if "/blobs/" in s.path and s.started >= started]
        if leaving:
            _wait_closed(leaving[-1], 30)
        figures["a device that leaves after 5 s: upstream closed after"] = _closed(leaving[-1]) if leaving else "-"
    return after_run(server, figures)


def _wait_closed(served, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while served.closed_at is None and time.monotonic() < deadline:
        time.sleep(0.2)


def _closed(served) -> str:
    if served.closed_at is None:
        return "still open"
    return f"{served.closed_at - served.started:.1f} s ({served.sent} bytes sent)"

