"""End to end, the registry side of a download going wrong (issue 10, items 4 and 7, and SSRF).

A real CNCF registry behind the counting, fault-injecting proxy (cuts, 429/503 with Retry-After), and a rogue
registry that misbehaves on purpose (a huge manifest, 10,000 layers, a config that drips, redirect loops, a token
realm or redirect pointing elsewhere). Both modes where the work happens in the preparation (workers in
two-tier mode), embedded where it happens in the API (resolving the tag).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import time

import pytest

from docker_http_passthrough.api import embedded_preparer
from docker_http_passthrough.shared.gzip_tail import TAIL_WINDOW
from tests.support.asgi import app_in_process, drive_asgi, embedded_env, wait_for
from tests.support.downloads import filename_for, get, image_url, tar_members
from tests.support.faults import BackgroundStream, assert_complete_tar, assert_json_error, stray_files
from tests.support.images import DOCKER_CONFIG, DOCKER_LAYER_GZIP, DOCKER_MANIFEST, make_config, make_layer, sha
from tests.support.rogue_registry import Answer, Drip, Huge, RogueRegistry

pytestmark = pytest.mark.e2e

MiB = 1 << 20


@pytest.fixture
def proxy(registry):
    registry.proxy.reset()
    yield registry.proxy
    registry.proxy.reset()


def layer_tars(body: bytes) -> list[bytes]:
    return [m for n, m in tar_members(body).items() if n.endswith("/layer.tar")]


def big_image(registry, repository: str, size: int = 6 * MiB):
    layer = make_layer({"payload.bin": os.urandom(size)})  # random: the gzip blob is as large
    return registry.push_image(repository, "v1", [make_layer({"a.txt": b"small"}), layer]), layer


# --------------------------------------------------------------------------- item 4: cuts, retries, Retry-After


def test_a_blob_cut_mid_transfer_resumes_with_range_and_costs_no_extra_bytes(mode, stack, registry, proxy,
                                                                              unique_repo):
    image, layer = big_image(registry, unique_repo)
    running = stack(mode, workers=1, env={"PREPARE_GRACE": "0"})  # no early start: no size probe of the blob
    proxy.cut(layer.digest, after_bytes=2 * MiB)

    result = get(image_url(running.url, registry.host, unique_repo, "v1"))

    assert_complete_tar(result)
    assert layer_tars(result.body) == [image.layers[0].tar, layer.tar]
    blob_gets = [(r.method, r.status) for r in proxy.requests if layer.digest in r.path]
    assert blob_gets == [("GET", 200), ("GET", 206)], blob_gets  # cut, then resumed from the offset
    assert proxy.body_bytes(layer.digest) == layer.size  # every byte crossed once
    assert stray_files(running.cache_dir) == []


def test_a_cut_during_an_early_start_stream_resumes_and_the_stream_completes(mode, stack, registry, proxy,
                                                                              unique_repo):
    image, layer = big_image(registry, unique_repo)
    running = stack(mode, workers=1, env={"PREPARE_GRACE": "1"})
    proxy.throttle_bytes_per_second = 3 * MiB  # the layer takes ~2 s: the response starts before it is done
    proxy.cut(layer.digest, after_bytes=3 * MiB)

    stream = BackgroundStream(image_url(running.url, registry.host, unique_repo, "v1"))
    stream.join(60)
    result = get(image_url(running.url, registry.host, unique_repo, "v1"))  # the same bytes, now warm

    assert stream.status == 200 and stream.error is None
    assert stream.received == int(stream.headers["content-length"]) == len(result.body)
    assert layer_tars(result.body) == [image.layers[0].tar, layer.tar]
    assert proxy.count("GET", path_contains=layer.digest, status=206) >= 1
    # The blob crossed once, plus the tail the early start's size probe asked for.
    assert layer.size <= proxy.body_bytes(layer.digest) <= layer.size + TAIL_WINDOW


def test_a_blob_cut_on_every_attempt_is_a_json_502_naming_the_retries(mode, stack, registry, proxy, unique_repo):
    _image, layer = big_image(registry, unique_repo, size=1 * MiB)
    running = stack(mode, workers=1, env={"PREPARE_GRACE": "0", "UPSTREAM_RETRIES": "2"})
    proxy.cut(layer.digest, after_bytes=100_000, times=100)

    result = get(image_url(running.url, registry.host, unique_repo, "v1"))

    assert_json_error(result, 502, error="registry_unreachable", words=("UPSTREAM_RETRIES=2", "cut"))
    assert proxy.count("GET", path_contains=layer.digest) == 3
    assert stray_files(running.cache_dir) == []


def test_429_and_503_with_retry_after_are_waited_for(mode, stack, registry, proxy, unique_repo):
    image, layer = big_image(registry, unique_repo, size=100_000)
    running = stack(mode, workers=1)
    proxy.fail("/manifests/v1", 429, headers={"Retry-After": "1"})  # the API resolving the tag
    later = email.utils.formatdate(time.time() + 1, usegmt=True)
    proxy.fail(layer.digest, 503, times=2, headers={"Retry-After": later})  # the preparation fetching a blob

    started = time.monotonic()
    result = get(image_url(running.url, registry.host, unique_repo, "v1"))

    assert_complete_tar(result)
    assert time.monotonic() - started >= 1.0
    assert [r.status for r in proxy.requests if "/manifests/v1" in r.path] == [429, 200]
    assert [r.status for r in proxy.requests if layer.digest in r.path] == [503, 503, 200]
    assert layer_tars(result.body)[1] == layer.tar


def test_a_retry_after_longer_than_the_cap_is_a_quick_502(stack, registry, proxy, unique_repo):
    big_image(registry, unique_repo, size=1000)
    running = stack("embedded", env={"UPSTREAM_RETRY_AFTER_MAX": "10"})
    proxy.fail("/manifests/v1", 429, times=5, headers={"Retry-After": "3600"})

    started = time.monotonic()
    result = get(image_url(running.url, registry.host, unique_repo, "v1"))

    assert_json_error(result, 502, error="rate_limited", words=("UPSTREAM_RETRY_AFTER_MAX=10s", "3600"))
    assert time.monotonic() - started < 2
    assert proxy.count(path_contains="/manifests/v1") == 1


# --------------------------------------------------------------------------- item 7: hostile registries


def rogue_image(layers: list[dict] | None = None, config: bytes | None = None) -> tuple[bytes, bytes]:
    config = config or make_config([])
    manifest = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
                           "config": {"mediaType": DOCKER_CONFIG, "digest": sha(config), "size": len(config)},
                           "layers": layers or []}).encode()
    return manifest, config


def test_a_huge_manifest_is_read_only_up_to_manifest_max_bytes(stack):
    manifest, config = rogue_image()
    running = stack("embedded")
    with RogueRegistry("evil/app", "v1", manifest, DOCKER_MANIFEST, {sha(config): config}) as rogue:
        # The HEAD names no digest, so the manifest is fetched; it is 200 MiB, chunked (no size up front).
        rogue.answers[rogue.manifest_path()] = Answer(200, {"Content-Type": DOCKER_MANIFEST}, Huge(200 * MiB))
        result = get(image_url(running.url, rogue.host, "evil/app", "v1"))
        assert_json_error(result, 502, error="limit_exceeded", words=("MANIFEST_MAX_BYTES=4194304",))
        wait_for_sync(lambda: all(s.closed_at or s.method == "HEAD" for s in rogue.served), 10)
        got = [s for s in rogue.served if s.method == "GET"]
    assert len(got) == 1 and got[0].sent < 32 * MiB, got  # 4 MiB read, plus what the sockets buffered


def test_ten_thousand_layers_are_refused_at_once_naming_image_max_layers(mode, stack):
    layers = [{"mediaType": DOCKER_LAYER_GZIP, "digest": "sha256:" + f"{i:064x}", "size": 1000} for i in range(10_000)]
    manifest, config = rogue_image(layers)
    running = stack(mode, workers=1)
    with RogueRegistry("evil/app", "v1", manifest, DOCKER_MANIFEST, {sha(config): config}) as rogue:
        started = time.monotonic()
        result = get(image_url(running.url, rogue.host, "evil/app", "v1"))
        took = time.monotonic() - started
        assert_json_error(result, 502, error="limit_exceeded", words=("10000 layers", "IMAGE_MAX_LAYERS=128"))
        assert took < 5, took
        assert not [r for r in rogue.requests if "/blobs/" in r[1]], "no blob, not even the config, was asked for"


@pytest.mark.parametrize("mode, dripping", [("embedded", "config"), ("two-tier", "layer")])
def test_a_dripping_blob_ends_at_upstream_deadline_and_its_connection_closes(stack, mode, dripping):
    """The config is read by the API (resolving the tag checks its platform), a layer by the preparation (a worker
    in two-tier mode): either way the transfer ends at its deadline, with a JSON error, and its connection closes."""
    layer = make_layer({"x.bin": os.urandom(1000)})
    config = make_config([layer])
    manifest, _ = rogue_image([{"mediaType": DOCKER_LAYER_GZIP, "digest": layer.digest, "size": layer.size}], config)
    running = stack(mode, workers=1, env={"UPSTREAM_DEADLINE": "3", "PREPARE_GRACE": "0"})
    with RogueRegistry("evil/app", "v1", manifest, DOCKER_MANIFEST, {sha(config): config}) as rogue:
        digest, data = (sha(config), config) if dripping == "config" else (layer.digest, layer.blob)
        rogue.answers[rogue.blob_path(digest)] = Answer(200, {}, Drip(data, every=1.0))
        started = time.monotonic()
        result = get(image_url(running.url, rogue.host, "evil/app", "v1"))
        assert_json_error(result, 504, error="upstream_deadline", words=("UPSTREAM_DEADLINE=3s",))
        assert time.monotonic() - started < 8
        drip = [s for s in rogue.served if s.path.endswith(digest)]
        wait_for_sync(lambda: drip[0].closed_at is not None, 5)
    assert drip[0].closed_at - drip[0].started < 4.5, "the upstream connection closed at the deadline"


def test_a_redirect_loop_stops_at_upstream_max_redirects(stack):
    config = make_config([])
    manifest, _ = rogue_image(config=config)
    running = stack("embedded", env={"UPSTREAM_MAX_REDIRECTS": "3"})
    with RogueRegistry("evil/app", "v1", manifest, DOCKER_MANIFEST, {}) as rogue:
        path = rogue.blob_path(sha(config))
        rogue.answers[path] = Answer(302, {"Location": path})
        result = get(image_url(running.url, rogue.host, "evil/app", "v1"))
        assert_json_error(result, 502, error="limit_exceeded", words=("UPSTREAM_MAX_REDIRECTS=3",))
        assert len([r for r in rogue.requests if r[1] == path]) == 4  # the request and 3 redirects, no retries


def wait_for_sync(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_upstream_work_nobody_needs_stops_and_its_connections_close(tmp_path, monkeypatch):
    """Embedded, a device that hangs up. While its tag is resolved (the config drips: the API reads it to check
    the platform), the fetch stops at once. While its image is prepared (a layer drips), the preparation goes on
    for ABANDONED_AFTER (a retrying device would join it), then it is cancelled — long before UPSTREAM_DEADLINE.
    A pre-warmed preparation is never abandoned."""
    monkeypatch.setattr(embedded_preparer, "ABANDONED_AFTER", 0.5)
    layer = make_layer({"slow.bin": os.urandom(2000)})
    config = make_config([layer])
    manifest, _ = rogue_image([{"mediaType": DOCKER_LAYER_GZIP, "digest": layer.digest, "size": layer.size}], config)
    dripping_config = make_config([]) + b" "
    other, _ = rogue_image(config=dripping_config)

    def closed_after(rogue: RogueRegistry, digest: str, since: float) -> float | None:
        served = [s for s in rogue.served if s.path.endswith(digest) and s.started >= since]
        return served[-1].closed_at - since if served and served[-1].closed_at else None

    async def hang_up(app, path: str) -> float:
        started = time.monotonic()
        sent = await asyncio.wait_for(drive_asgi(app, path, disconnect_after=1.0), 10)
        # The request stopped waiting at once (499: nobody is there to read it).
        assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [499]
        assert time.monotonic() - started < 2
        return started

    async def scenario(rogue: RogueRegistry) -> tuple[float, float]:
        env = embedded_env(tmp_path, UPSTREAM_DEADLINE="600", PREPARE_GRACE="0")
        async with app_in_process(env) as (app, client):
            started = await hang_up(app, f"/registry/http/{rogue.host}/docker/{filename_for('evil/app', 'v2')}")
            await wait_for(lambda: closed_after(rogue, sha(dripping_config), started), timeout=5)
            resolving = closed_after(rogue, sha(dripping_config), started)

            path = f"/registry/http/{rogue.host}/docker/{filename_for('evil/app', 'v1')}"
            started = await hang_up(app, path)
            await wait_for(lambda: closed_after(rogue, layer.digest, started), timeout=5)
            assert app.state.preparer.running == {}
            preparing = closed_after(rogue, layer.digest, started)

            started = time.monotonic()
            assert (await client.post(path)).status_code == 202
            await asyncio.sleep(1.5)
            assert list(app.state.preparer.running) and closed_after(rogue, layer.digest, started) is None
            return resolving, preparing

    with RogueRegistry("evil/app", "v1", manifest, DOCKER_MANIFEST, {sha(config): config}) as rogue:
        rogue.answers[rogue.blob_path(layer.digest)] = Answer(200, {}, Drip(layer.blob, every=0.2))
        rogue.answers[rogue.manifest_path("v2")] = Answer(200, {"Content-Type": DOCKER_MANIFEST,
                                                               "Docker-Content-Digest": sha(other)}, other)
        rogue.answers[rogue.manifest_path(sha(other))] = rogue.answers[rogue.manifest_path("v2")]
        rogue.answers[rogue.blob_path(sha(dripping_config))] = Answer(200, {}, Drip(dripping_config, every=0.2))
        resolving, preparing = asyncio.run(scenario(rogue))
    assert resolving < 1.6, resolving  # hung up at 1 s: the fetch stopped with it
    assert preparing < 2.5, preparing  # hung up at 1 s, cancelled 0.5 s later


# --------------------------------------------------------------------------- SSRF: REGISTRY_ALLOWED_HOSTS


def test_default_policy_refuses_loopback_and_metadata_hosts_without_connecting(stack, registry, proxy, unique_repo):
    registry.push_image(unique_repo, "v1", [make_layer({"a.txt": b"a"})])
    running = stack("embedded", env={"REGISTRY_ALLOWED_HOSTS": ""})  # the default: public,private
    port = registry.proxy.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::ffff:127.0.0.1]:{port}", "169.254.169.254",
                 "metadata.google.internal", "0.0.0.0"):
        result = get(f"{running.url}/registry/http/{host}/docker/{filename_for(unique_repo, 'v1')}")
        body = assert_json_error(result, 403, error="registry_not_allowed", words=("REGISTRY_ALLOWED_HOSTS",))
        if host.startswith("localhost"):
            assert "127.0.0.1" not in body["message"], body  # what a name resolves to is not told
    assert proxy.count() == 0


def test_an_allowed_registry_cannot_send_us_elsewhere_by_redirect_or_token_realm(mode, stack, registry):
    """Allowed: the rogue registry at 127.0.0.1:<port>, by name. Its blob redirect and its token realm point at
    127.0.0.2, another host as far as the policy is concerned: both are refused, and 127.0.0.2 sees nothing."""
    layer = make_layer({"x.txt": b"x"})
    config = make_config([layer])
    manifest, _ = rogue_image([{"mediaType": DOCKER_LAYER_GZIP, "digest": layer.digest, "size": layer.size}],
                              config=config)
    with RogueRegistry("x/app", "v1", b"{}", "application/json", {}, host="127.0.0.2") as elsewhere, \
            RogueRegistry("evil/app", "v1", manifest, DOCKER_MANIFEST, {sha(config): config}) as rogue:
        running = stack(mode, workers=1, env={"REGISTRY_ALLOWED_HOSTS": rogue.host, "PREPARE_GRACE": "0"})
        rogue.answers[rogue.blob_path(layer.digest)] = Answer(307, {"Location": f"{elsewhere.url}/blob"})
        redirected = get(image_url(running.url, rogue.host, "evil/app", "v1"))
        assert_json_error(redirected, 403, error="registry_not_allowed", words=("127.0.0.2",))

        challenge = f'Bearer realm="{elsewhere.url}/token",service="evil"'
        rogue.answers[rogue.manifest_path("v2")] = Answer(401, {"WWW-Authenticate": challenge})
        realm = get(image_url(running.url, rogue.host, "evil/app", "v2"))
        assert_json_error(realm, 403, error="registry_not_allowed", words=("127.0.0.2",))
        assert elsewhere.requests == []
