"""Transfers from registries (shared/registry.py, blob_stream.py, retry.py): retries and Retry-After, resuming a
cut blob with Range, the deadline of one transfer, and documents read with a cap. In-memory fake registry; the
end-to-end versions with a real registry and proxy are in test_e2e_upstream.py."""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import io
import os
import tarfile
import time

import httpx
import pytest
from docker_http_passthrough.shared import manifest as mf
from docker_http_passthrough.shared.errors import (
    InvalidContent,
    LimitExceeded,
    NotFound,
    TimedOut,
    Unreachable,
    Unsupported,
)
from docker_http_passthrough.shared.layer_download import fetch_layer
from docker_http_passthrough.shared.locks import LocalLocks
from docker_http_passthrough.shared.prepare import prepare_image
from docker_http_passthrough.shared.registry import RegistryClient
from docker_http_passthrough.shared.retry import Attempts, GiveUp, retry_after
from docker_http_passthrough.shared.settings import Settings
from docker_http_passthrough.shared.store import Store
from docker_http_passthrough.shared.targets import RegistryTarget, docker_hub_target
from docker_http_passthrough.shared.upstream_http import registries_for

from tests.support.fake_registry import ALICE, CONFIG_BLOB, REPO, ChunkStream, FakeRegistry, sample_registry, streamed, target
from tests.support.images import DOCKER_CONFIG, DOCKER_MANIFEST, sha
from tests.support.rogue_registry import RogueRegistry

GZIP_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


class CutStream(httpx.AsyncByteStream):
    """A body that breaks after ``after`` bytes, as a connection cut mid-blob does."""

    def __init__(self, data: bytes, after: int, chunk: int = 1000):
        self.data, self.after, self.chunk = data, after, chunk

    async def __aiter__(self):
        for start in range(0, self.after, self.chunk):
            yield self.data[start:min(start + self.chunk, self.after)]
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


def tar_of(data: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        info = tarfile.TarInfo("payload.bin")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "cache")


def layer_registry(tar: bytes) -> tuple[FakeRegistry, mf.Descriptor, str, bytes]:
    """A fake registry holding ``tar`` as a gzip layer: (fake, its descriptor, its diff_id, the blob)."""
    blob = gzip.compress(tar, mtime=0)
    fake = FakeRegistry(chunk=1000)
    fake.add_blob(blob)
    return fake, mf.Descriptor(GZIP_LAYER, sha(blob), len(blob)), sha(tar), blob


def cut(blob: bytes, after: int, start: int = 0) -> httpx.Response:
    """The blob from ``start`` (a 206 unless 0), breaking after ``after`` bytes."""
    headers = {"Content-Length": str(len(blob) - start)}
    if start:
        headers["Content-Range"] = f"bytes {start}-{len(blob) - 1}/{len(blob)}"
    return httpx.Response(206 if start else 200, headers=headers, stream=CutStream(blob[start:], after))


# --- Retry-After and backoff


def test_retry_after_reads_seconds_and_http_dates():
    def answer(value: str) -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": value})

    assert retry_after(answer("7")) == 7.0
    now = time.time()
    assert retry_after(answer(email.utils.formatdate(now + 30, usegmt=True)), now) == pytest.approx(30, abs=1)
    assert retry_after(answer(email.utils.formatdate(now - 30, usegmt=True)), now) == 0.0
    assert retry_after(answer("soon")) is None and retry_after(httpx.Response(503)) is None


@pytest.mark.anyio
async def test_attempts_give_up_naming_the_setting_that_stops_them():
    loop = asyncio.get_running_loop()
    attempts = Attempts(retries=1, deadline=loop.time() + 60, retry_after_max=5)
    await attempts.pause(httpx.Response(503, headers={"Retry-After": "0"}), "HTTP 503")
    with pytest.raises(GiveUp, match="UPSTREAM_RETRIES=1"):
        await attempts.pause(None, "cut")
    with pytest.raises(GiveUp, match="UPSTREAM_RETRY_AFTER_MAX=5s"):
        await Attempts(3, loop.time() + 60, 5).pause(httpx.Response(429, headers={"Retry-After": "6"}), "HTTP 429")
    with pytest.raises(GiveUp, match="deadline"):
        await Attempts(3, loop.time() + 1, 30).pause(httpx.Response(429, headers={"Retry-After": "2"}), "HTTP 429")


@pytest.mark.anyio
async def test_429_and_503_are_retried_after_what_retry_after_says_and_404_is_not():
    fake = sample_registry()
    answers = [httpx.Response(429, headers={"Retry-After": "1"}), httpx.Response(503)]
    fake.override = lambda request: answers.pop(0) if answers and request.method == "HEAD" else None
    async with fake.http() as http:
        started = time.monotonic()
        head = await RegistryClient(http, target(), REPO).head_manifest("v1")
        assert time.monotonic() - started >= 1.0  # Retry-After: 1 was honoured
        assert head.digest == sha(fake.manifests["v1"][0])
        assert [r.method for r in fake.requests] == ["HEAD"] * 3
        fake.requests.clear()
        with pytest.raises(NotFound):
            await RegistryClient(http, target(), REPO).head_manifest("missing")
        assert len(fake.requests) == 1


@pytest.mark.anyio
async def test_a_retry_after_past_the_cap_fails_at_once():
    fake = sample_registry()
    fake.override = lambda request: httpx.Response(429, headers={"Retry-After": "3600"})
    async with fake.http(upstream_retry_after_max=30) as http:
        started = time.monotonic()
        with pytest.raises(Unreachable) as info:
            await RegistryClient(http, target(), REPO).head_manifest("v1")
    assert time.monotonic() - started < 1
    assert info.value.code == "rate_limited" and "UPSTREAM_RETRY_AFTER_MAX=30s" in info.value.message
    assert len(fake.requests) == 1


@pytest.mark.anyio
async def test_retries_end_by_the_clients_deadline():
    """A download's resolution must end by RESOLVE_TIMEOUT however much retrying is left."""
    fake = sample_registry()
    fake.override = lambda request: httpx.Response(503, headers={"Retry-After": "1"})
    async with fake.http(upstream_retries=10, resolve_timeout=2.5) as http:
        until = asyncio.get_running_loop().time() + 2.5
        started = time.monotonic()
        with pytest.raises(Unreachable) as info:
            await RegistryClient(http, target(), REPO, until=until).head_manifest("v1")
    assert time.monotonic() - started < 2.6
    assert "deadline" in info.value.message and 2 <= len(fake.requests) <= 3


# --- resume after a cut


@pytest.mark.anyio
async def test_a_cut_blob_resumes_from_the_received_offset_and_verifies_as_a_whole(store):
    tar = tar_of(os.urandom(300_000))
    fake, layer, diff_id, blob = layer_registry(tar)
    cuts = [123_457]

    def cut_once(request):
        if "/blobs/" in request.url.path and "range" not in request.headers and cuts:
            return cut(blob, cuts.pop())
        return None

    fake.override = cut_once
    async with fake.http() as http:
        size = await fetch_layer(RegistryClient(http, target(), REPO), store, layer, diff_id)
    assert size == len(tar) and store.layer_path(diff_id).read_bytes() == tar
    gets = [r for r in fake.requests if "/blobs/" in r.url.path]
    assert [r.headers.get("range") for r in gets] == [None, "bytes=123457-"]


@pytest.mark.anyio
async def test_a_server_that_ignores_range_is_read_again_from_the_start_skipping_what_we_have(store):
    tar = tar_of(os.urandom(200_000))
    fake, layer, diff_id, blob = layer_registry(tar)
    cuts = [50_000]

    def no_ranges(request):
        if "/blobs/" not in request.url.path:
            return None
        if cuts:
            return cut(blob, cuts.pop())
        return streamed(blob, chunk=777)  # a 200 with everything, Range or not

    fake.override = no_ranges
    async with fake.http() as http:
        await fetch_layer(RegistryClient(http, target(), REPO), store, layer, diff_id)
    assert store.layer_path(diff_id).read_bytes() == tar


@pytest.mark.anyio
async def test_a_resume_answered_from_the_wrong_offset_is_refused_and_nothing_is_stored(store):
    tar = tar_of(os.urandom(100_000))
    fake, layer, diff_id, blob = layer_registry(tar)

    def wrong_range(request):
        if "/blobs/" not in request.url.path:
            return None
        if "range" not in request.headers:
            return cut(blob, 10_000)
        return streamed(blob[5_000:], 206, **{"Content-Range": f"bytes 5000-{len(blob) - 1}/{len(blob)}"})

    fake.override = wrong_range
    async with fake.http() as http:
        with pytest.raises(InvalidContent, match="resume at byte 10000"):
            await fetch_layer(RegistryClient(http, target(), REPO), store, layer, diff_id)
    assert not store.layer_path(diff_id).exists()
    assert [p for p in store.root.rglob("*") if p.is_file()] == []


@pytest.mark.anyio
async def test_a_blob_cut_every_time_fails_after_the_retries_naming_them(store):
    tar = tar_of(os.urandom(50_000))
    fake, layer, diff_id, blob = layer_registry(tar)

    def always_cut(request):
        if "/blobs/" not in request.url.path:
            return None
        return cut(blob, 1000, start=int(request.headers.get("range", "bytes=0-")[6:-1]))

    fake.override = always_cut
    async with fake.http(upstream_retries=2) as http:
        with pytest.raises(Unreachable, match="UPSTREAM_RETRIES=2") as info:
            await fetch_layer(RegistryClient(http, target(), REPO), store, layer, diff_id)
    assert "cut after 3000 bytes" in info.value.message
    assert len([r for r in fake.requests if "/blobs/" in r.url.path]) == 3


# --- one deadline per transfer, documents read with a cap


@pytest.mark.anyio
async def test_a_dripping_config_ends_at_the_transfer_deadline():
    class Drip(httpx.AsyncByteStream):
        closed = False

        async def __aiter__(self):
            for _ in range(1000):
                await asyncio.sleep(0.2)
                yield b"{"

        async def aclose(self):
            Drip.closed = True

    fake = sample_registry()
    fake.override = lambda request: httpx.Response(200, stream=Drip()) if "/blobs/" in request.url.path else None
    async with fake.http(upstream_deadline=1.0) as http:
        started = time.monotonic()
        with pytest.raises(TimedOut) as info:
            await RegistryClient(http, target(), REPO).get_blob(sha(b"{}"), size=5000)
    assert time.monotonic() - started < 1.5
    assert info.value.code == "upstream_deadline" and "UPSTREAM_DEADLINE=1s" in info.value.message
    assert Drip.closed, "the upstream response was closed"


@pytest.mark.anyio
async def test_a_huge_manifest_is_read_only_up_to_the_cap():
    sent = []

    class Huge(ChunkStream):
        async def __aiter__(self):
            for _ in range(200 * 16):  # 200 MiB in 64 KiB pieces, if anyone read them all
                sent.append(1)
                yield b" " * (64 << 10)

    fake = sample_registry()
    fake.override = lambda request: httpx.Response(200, headers={"Content-Type": DOCKER_MANIFEST},
                                                   stream=Huge(b"")) if request.method == "GET" else None
    async with fake.http(manifest_max_bytes=1 << 20) as http:
        with pytest.raises(LimitExceeded, match="MANIFEST_MAX_BYTES=1048576"):
            await RegistryClient(http, target(), REPO).get_manifest("v1")
        fake.override = lambda request: httpx.Response(200, headers={"Content-Length": str(200 << 20)},
                                                       stream=Huge(b""))
        with pytest.raises(LimitExceeded):
            await RegistryClient(http, target(), REPO).head_manifest("v1")  # a HEAD that tells the size
    assert len(sent) <= 17  # 1 MiB and one piece past it; nothing of the second


def image_with_layers(count: int, size: int) -> tuple[FakeRegistry, str]:
    config = b'{"rootfs": {"type": "layers", "diff_ids": []}}'
    layers = [{"mediaType": GZIP_LAYER, "digest": "sha256:" + f"{i:064x}", "size": size} for i in range(count)]
    manifest = (b'{"schemaVersion": 2, "mediaType": "%s", "config": {"mediaType": "%s", "digest": "%s", '
                b'"size": %d}, "layers": %s}') % (DOCKER_MANIFEST.encode(), DOCKER_CONFIG.encode(),
                                                   sha(config).encode(), len(config),
                                                   str(layers).replace("'", '"').encode())
    fake = FakeRegistry()
    return fake, fake.add_image(manifest, config, [], reference="v1")


@pytest.mark.parametrize("count, size, setting", [(10_000, 100, "IMAGE_MAX_LAYERS=128"),
                                                  (3, 20 << 30, "IMAGE_MAX_BYTES=34359738368")])
@pytest.mark.anyio
async def test_layer_count_and_image_size_are_checked_before_any_blob_is_fetched(store, count, size, setting):
    fake, digest = image_with_layers(count, size)
    started = time.monotonic()
    async with fake.http() as http:
        with pytest.raises(LimitExceeded, match=setting):
            await prepare_image(RegistryClient(http, target(), REPO), store, digest, LocalLocks())
    assert time.monotonic() - started < 2
    assert [r.url.path.split("/")[-2] for r in fake.requests] == ["manifests"]  # not even the config


@pytest.mark.anyio
async def test_a_gzip_bomb_stops_at_the_image_size_limit_and_stores_nothing(store):
    tar = tar_of(bytes(8 << 20))  # 8 MiB of zeros: a few KiB of gzip
    fake, layer, diff_id, _blob = layer_registry(tar)
    async with fake.http(image_max_bytes=1 << 20) as http:
        with pytest.raises(LimitExceeded, match="IMAGE_MAX_BYTES=1048576"):
            await fetch_layer(RegistryClient(http, target(), REPO), store, layer, diff_id)
    assert [p for p in store.root.rglob("*") if p.is_file()] == []


# --- REGISTRY_MIRROR


@pytest.mark.anyio
async def test_docker_hub_pulls_ask_the_mirror_first_and_fall_back_to_docker_hub():
    fake = sample_registry()
    fake.missing.add(("mirror.example", sha(CONFIG_BLOB)))  # the mirror has the manifest, not the config
    fake.override = lambda request: httpx.Response(200, json={"token": "hub"}) \
        if request.url.host == "auth.docker.io" else None
    async with fake.http(registry_mirror="https://mirror.example") as http:
        await RegistryClient(http, docker_hub_target(), REPO).head_manifest("v1")
        assert [r.url.host for r in fake.requests] == ["mirror.example"]  # anonymous, no token needed
        fake.requests.clear()
        await RegistryClient(http, docker_hub_target(), REPO).get_blob(sha(CONFIG_BLOB))
        assert [r.url.host for r in fake.requests] == ["mirror.example", "auth.docker.io", "registry-1.docker.io"]
        fake.requests.clear()
        await RegistryClient(http, docker_hub_target(), REPO, ALICE).head_manifest("v1")  # the client's own
        assert [r.url.host for r in fake.requests] == ["auth.docker.io", "registry-1.docker.io"]
        fake.requests.clear()
        await RegistryClient(http, target(), REPO).head_manifest("v1")  # not Docker Hub: no mirror
        assert [r.url.host for r in fake.requests] == ["reg.example"]


# --- foreign layers (descriptor `urls`) go through the guarded client


@pytest.mark.anyio
async def test_a_foreign_layer_url_is_checked_against_registry_allowed_hosts_like_a_registry_a_client_names(store):
    """The registry (REGISTRY_URL, trusted) lacks the layer; its descriptor's URL points at 127.0.0.2, which
    ALLOW_FOREIGN_LAYERS=* would allow but REGISTRY_ALLOWED_HOSTS does not: refused, and nothing reaches it."""
    tar = tar_of(b"foreign")
    blob = gzip.compress(tar, mtime=0)
    with RogueRegistry("x/app", "v1", b"{}", "application/json", {}, host="127.0.0.2") as elsewhere, \
            RogueRegistry("team/app", "v1", b"{}", "application/json", {}) as registry:
        layer = mf.Descriptor("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", sha(blob), len(blob),
                              (f"{elsewhere.url}/layer.tar.gz",))
        settings = Settings(registry_url=registry.url, foreign_layer_hosts=("*",), registry_allowed_hosts="public")
        async with registries_for(settings) as registries:
            client = RegistryClient(registries, RegistryTarget(registry.url, registry.host), "team/app")
            with pytest.raises(Unsupported, match="REGISTRY_ALLOWED_HOSTS") as info:
                await fetch_layer(client, store, layer, sha(tar))
    assert info.value.code == "foreign_layer" and elsewhere.requests == []
    assert [r[1] for r in registry.requests] == [f"/v2/team/app/blobs/{layer.digest}"]  # the registry was asked
