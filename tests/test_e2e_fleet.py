"""Fleet rollouts: resumable transfers, pre-warming, a bounded cache, error caching, stale serving, and
starting the response before a slow preparation is done."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support.downloads import get, get_many, image_url, tar_members
from tests.support.images import make_layer
from tests.support.services import ServerProcess

pytestmark = pytest.mark.e2e


def _random_layer(name: str, size: int):
    return make_layer({name: os.urandom(size)})


def test_head_range_and_if_range_resume_a_cut_transfer(mode, stack, registry, unique_repo):
    registry.push_image(unique_repo, "v1", [_random_layer("a.bin", 700_000), _random_layer("b.bin", 300_000)])
    running = stack(mode)
    url = image_url(running.url, registry.host, unique_repo, "v1")
    full = get(url)
    assert full.status == 200
    size = len(full.body)

    with httpx.Client(timeout=60, trust_env=False) as client:
        registry.proxy.reset()
        head = client.head(url)
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) == size
        assert head.headers["accept-ranges"] == "bytes"
        etag = head.headers["etag"]
        assert etag.startswith('"') and not etag.startswith('W/')
        assert registry.proxy.count("GET") == 0  # prepared: HEAD starts nothing

        # A transfer cut at an arbitrary byte, resumed with Range + If-Range, joins to the same file.
        for cut in (1, 511, 512, 1000, size // 2, size - 1):
            rest = client.get(url, headers={"Range": f"bytes={cut}-", "If-Range": etag})
            assert rest.status_code == 206
            assert rest.headers["content-range"] == f"bytes {cut}-{size - 1}/{size}"
            assert full.body[:cut] + rest.content == full.body
        middle = client.get(url, headers={"Range": "bytes=100-199"})
        assert middle.status_code == 206 and middle.content == full.body[100:200]
        suffix = client.get(url, headers={"Range": "bytes=-10"})
        assert suffix.content == full.body[-10:]
        stale = client.get(url, headers={"Range": "bytes=10-", "If-Range": '"something-else"'})
        assert stale.status_code == 200 and stale.content == full.body
        beyond = client.get(url, headers={"Range": f"bytes={size}-"})
        assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{size}"


def test_prewarm_answers_202_and_its_status_runs_to_done(mode, stack, registry, unique_repo):
    layers = [_random_layer(f"l{i}", 400_000) for i in range(3)]
    registry.push_image(unique_repo, "v1", layers)
    running = stack(mode)
    url = image_url(running.url, registry.host, unique_repo, "v1")
    registry.proxy.throttle_bytes_per_second = 300_000  # slow enough to watch it run

    with httpx.Client(base_url=running.url, timeout=60, trust_env=False) as client:
        started = client.post(url)
        assert started.status_code == 202, started.text
        status_url = started.json()["status_url"]
        assert started.headers["location"] == status_url and "?" not in status_url
        assert started.json()["state"] in ("queued", "running")
        states = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = client.get(status_url).json()
            states.append(status)
            if status["state"] in ("done", "failed"):
                break
            time.sleep(0.3)
        assert states[-1]["state"] == "done", states
        running_states = [s for s in states if s["state"] == "running" and s.get("layers_total")]
        assert running_states and running_states[0]["layers_total"] == 3
        assert all(s["layers_done"] <= s["layers_total"] for s in running_states)
        assert client.post(url).status_code == 200  # already prepared
        registry.proxy.reset()
        assert get(url).status == 200
        assert registry.proxy.count("GET") == 0
        assert client.get("/status/prepare-unknown").status_code == 404


def test_failed_prewarm_status_shows_the_cause(mode, stack, registry, unique_repo):
    image = registry.push_image(unique_repo, "v1", [_random_layer("x", 100_000)])
    running = stack(mode)
    registry.proxy.fail_status = {image.layers[0].digest: 500}
    with httpx.Client(base_url=running.url, timeout=60, trust_env=False) as client:
        status_url = client.post(image_url(running.url, registry.host, unique_repo, "v1")).json()["status_url"]
        deadline = time.monotonic() + 30
        while (status := client.get(status_url).json())["state"] not in ("done", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert status["state"] == "failed"
    assert "500" in status["error"]["message"]


def test_cache_evicts_least_recently_used_layers(mode, stack, registry, unique_repo):
    names = ["one", "two", "three"]
    for name in names:
        registry.push_image(f"{unique_repo}-{name}", "v1", [_random_layer(name, 1_000_000)])
    running = stack(mode, env={"CACHE_MAX_BYTES": "2500000"})  # room for two 1 MB layers
    layers_dir = Path(running.cache_dir) / "layers" / "sha256"

    def download(name: str) -> bytes:
        result = get(image_url(running.url, registry.host, f"{unique_repo}-{name}", "v1"))
        assert result.status == 200
        return result.body

    first = download("one")
    download("two")
    download("one")  # "one" is now more recent than "two"
    download("three")  # over the limit: "two" goes
    stored = {p.name for p in layers_dir.iterdir()}
    assert len(stored) == 2
    registry.proxy.reset()
    assert download("one") == first
    assert registry.proxy.count("GET", kind="blob") == 0  # "one" survived
    download("two")
    assert registry.proxy.count("GET", kind="blob") >= 1  # "two" had been evicted and came back


def test_missing_tag_is_remembered_briefly(mode, stack, registry, unique_repo):
    running = stack(mode, env={"ERROR_CACHE_SECONDS": "2"})
    url = image_url(running.url, registry.host, unique_repo, "missing")
    registry.proxy.reset()
    assert [get(url).status for _ in range(10)] == [404] * 10
    assert registry.proxy.count(kind="manifest") == 1
    time.sleep(2.5)
    assert get(url).status == 404
    assert registry.proxy.count(kind="manifest") == 2


@pytest.mark.parametrize("fault", ["connection-refused", "503", "429"])
def test_stale_if_error_serves_prepared_tag(stack, registry_factory, unique_repo, fault):
    own = registry_factory()
    own.push_image(unique_repo, "v1", [_random_layer("s", 200_000)])
    running = stack("embedded")
    url = image_url(running.url, own.host, unique_repo, "v1")
    fresh = get(url)
    assert fresh.status == 200 and "x-served-stale" not in fresh.headers

    if fault == "connection-refused":
        own.stop()
    else:
        own.proxy.fail_status = {"/v2/": int(fault)}
    stale = get(url)
    assert stale.status == 200, stale.body[:300]
    assert stale.body == fresh.body
    assert stale.headers["x-served-stale"] == "registry unreachable"
    assert "stale" in running.logs()

    off = stack("embedded", env={"SERVE_STALE": "false"}, cache_dir=Path(running.cache_dir))
    refused = get(url.replace(running.url, off.url))
    assert refused.status == 502 and refused.headers["content-type"] == "application/json"


def test_stale_is_never_served_to_client_credentials(stack, registry, unique_repo):
    registry.push_image(unique_repo, "v1", [_random_layer("s", 10_000)])
    running = stack("embedded")
    url = image_url(running.url, registry.host, unique_repo, "v1")
    assert get(url).status == 200
    registry.proxy.fail_status = {"/v2/": 503}
    assert get(url, auth=("someone", "pw")).status == 502


def test_slow_preparation_starts_response_within_grace(mode, stack, registry, unique_repo):
    """A throttled registry: headers with the exact length come after the grace period, bytes are right."""
    layers = [_random_layer("big1", 1_500_000), make_layer({"plain": os.urandom(300_000)}, compression="none"),
              _random_layer("big2", 1_000_000)]
    registry.push_image(unique_repo, "v1", layers)
    running = stack(mode, env={"PREPARE_GRACE": "1"})
    url = image_url(running.url, registry.host, unique_repo, "v1")
    registry.proxy.throttle_bytes_per_second = 500_000  # ~3 MB of blobs: ~6 s to prepare

    started = time.monotonic()
    with httpx.Client(timeout=60, trust_env=False) as client, client.stream("GET", url) as response:
        headers_after = time.monotonic() - started
        body = response.read()
    assert response.status_code == 200, body[:300]
    assert headers_after < 4, headers_after
    assert int(response.headers["content-length"]) == len(body)
    registry.proxy.reset()
    assert get(url).body == body  # the warm archive is the same bytes
    members = tar_members(body)
    assert [m for n, m in members.items() if n.endswith("layer.tar")] == [layer.tar for layer in layers]


def test_failure_after_headers_closes_the_connection_early(mode, stack, registry, unique_repo):
    layers = [_random_layer("ok", 1_000_000), _random_layer("bad", 1_000_000)]
    registry.push_image(unique_repo, "v1", layers)
    running = stack(mode, env={"PREPARE_GRACE": "1"})
    registry.proxy.throttle_bytes_per_second = 400_000
    registry.proxy.corrupt_path_contains = layers[1].digest  # fails its digest check after the headers went out

    received = bytearray()
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        with httpx.Client(timeout=60, trust_env=False) as client:
            with client.stream("GET", image_url(running.url, registry.host, unique_repo, "v1")) as response:
                assert response.status_code == 200
                expected = int(response.headers["content-length"])
                for chunk in response.iter_raw():
                    received += chunk
    assert len(received) < expected
    assert b"manifest.json" not in received  # never the closing files of an image that did not verify


def test_concurrent_downloads_while_a_slow_client_reads(stack, registry, unique_repo):
    """A slow reader does not hold back others (no head-of-line blocking in the server)."""
    registry.push_image(unique_repo, "v1", [_random_layer("s", 3_000_000)])
    running = stack("embedded")
    url = image_url(running.url, registry.host, unique_repo, "v1")
    full = get(url).body
    done = threading.Event()

    def slow_reader() -> None:
        with httpx.Client(timeout=60, trust_env=False) as client, client.stream("GET", url) as response:
            for _ in response.iter_raw(65536):
                time.sleep(0.05)
                if done.is_set():
                    break

    thread = threading.Thread(target=slow_reader)
    thread.start()
    try:
        started = time.monotonic()
        assert get(url).body == full
        assert time.monotonic() - started < 5
    finally:
        done.set()
        thread.join()


def test_client_hanging_up_stops_the_stream_and_is_logged_incomplete(stack, registry, unique_repo):
    """A switch whose copy is interrupted: the server stops reading the archive and says so in its log."""
    registry.push_image(unique_repo, "v1", [make_layer({"zeros.bin": bytes(64 << 20)})])
    running = stack("embedded")
    url = image_url(running.url, registry.host, unique_repo, "v1")
    size = len(get(url).body)

    with httpx.Client(timeout=60, trust_env=False) as client, client.stream("GET", url) as response:
        next(response.iter_raw(1024))  # the first bytes, then hang up
    deadline = time.monotonic() + 10
    while "connection closed early" not in running.server.log_text():
        assert time.monotonic() < deadline, running.server.log_text()[-2000:]
        time.sleep(0.1)
    line = next(line for line in running.server.log_text().splitlines() if "connection closed early" in line)
    sent = int(line.split(" bytes=")[1].split()[0])
    assert sent < size // 2, line


def test_two_api_processes_and_workers_share_one_volume(stack, registry, unique_repo, tmp_path):
    """Two API replicas behind a load balancer, two workers, one Redis, one CACHE_DIR: still one preparation."""
    layers = [_random_layer(f"l{i}", 500_000) for i in range(3)]
    image = registry.push_image(unique_repo, "v1", layers)
    running = stack("two-tier", workers=2)
    second = ServerProcess(running.server_env(), tmp_path / "second-api.log")
    try:
        registry.proxy.throttle_bytes_per_second = 2_000_000  # both replicas ask while it is still preparing
        urls = [image_url(api.url, registry.host, unique_repo, "v1") for api in (running, second)] * 6
        results = get_many(urls)
    finally:
        second.stop()
    assert [r.status for r in results] == [200] * 12
    assert len({r.body for r in results}) == 1
    for blob in [image.config_digest] + [layer.digest for layer in layers]:
        assert registry.proxy.count("GET", kind="blob", path_contains=blob, status=200) == 1


def test_leftovers_of_crashed_writes_are_swept_at_start(stack, tmp_path):
    cache = tmp_path / "shared-cache"
    leftovers = [cache / "layers" / "sha256" / ("ab" * 32 + ".tar.partial-dead01"),
                 cache / "blobs" / "sha256" / ("cd" * 32 + ".partial-dead02")]
    live = cache / "layers" / "sha256" / ("ef" * 32 + ".tar.partial-live03")  # a writer on another host, busy
    for path in leftovers + [live]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a layer")
    hour_ago = time.time() - 3600
    for path in leftovers:
        os.utime(path, (hour_ago, hour_ago))

    stack("embedded", cache_dir=cache)

    assert not any(path.exists() for path in leftovers)
    assert live.exists()
