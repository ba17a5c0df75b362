"""Foreign (non-distributable) layers: fetched from their descriptor's URLs only when ALLOW_FOREIGN_LAYERS allows
the host (at every redirect too), never with the registry's credentials, verified like any blob; otherwise an
error that names the layer and the setting. The registry is the in-memory fake; other hosts answer through its
``override``."""

from __future__ import annotations

import gzip
from pathlib import Path

import httpx
import pytest

from docker_http_passthrough.shared import manifest as mf
from docker_http_passthrough.shared.errors import InvalidContent, Unsupported
from docker_http_passthrough.shared.foreign_layers import host_allowed, url_problem
from docker_http_passthrough.shared.layer_download import fetch_layer
from docker_http_passthrough.shared.registry import RegistryClient
from docker_http_passthrough.shared.settings import SettingsError, load_settings
from docker_http_passthrough.shared.store import Store
from tests.support.fake_registry import ALICE, REPO, USERS, FakeRegistry, streamed, target
from tests.support.images import make_layer

FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
LAYER = make_layer({"Files/License.txt": b"windows base layer stand-in\n" * 50})
URL = "https://mcr.example/windows/base/layer.tar.gz"


def descriptor(*urls: str, media_type: str = FOREIGN) -> mf.Descriptor:
    return mf.Descriptor(media_type, LAYER.digest, LAYER.size, urls)


def foreign_host(fake: FakeRegistry, routes: dict[str, httpx.Response]) -> None:
    """Hosts other than the registry: URL → response (anything else is 404)."""
    def answer(request: httpx.Request) -> httpx.Response | None:
        if request.url.host == "reg.example":
            return None
        return routes.get(str(request.url.copy_with(query=None)), httpx.Response(404))
    fake.override = answer


async def fetch(fake: FakeRegistry, store: Store, layer: mf.Descriptor, allowed: tuple[str, ...],
                credentials=None) -> int:
    async with fake.http() as registries:
        registries.foreign_layer_hosts = allowed
        client = RegistryClient(registries, target(), REPO, credentials)
        return await fetch_layer(client, store, layer, LAYER.diff_id)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "cache")


@pytest.mark.anyio
async def test_off_by_default_the_error_names_the_layer_its_urls_and_the_setting(store):
    fake = FakeRegistry()
    foreign_host(fake, {URL: streamed(LAYER.blob)})
    with pytest.raises(Unsupported) as info:
        await fetch(fake, store, descriptor(URL), ())
    message = info.value.message
    assert info.value.code == "foreign_layer" and info.value.status == 502
    assert LAYER.digest in message and URL in message and "ALLOW_FOREIGN_LAYERS=mcr.example" in message
    assert fake.to("mcr.example") == []  # never asked
    assert not store.layer_path(LAYER.diff_id).exists()


@pytest.mark.anyio
async def test_allowed_it_comes_from_the_url_without_the_registrys_credentials(store):
    fake = FakeRegistry("basic", users=USERS)
    foreign_host(fake, {URL: streamed(LAYER.blob, chunk=500)})
    size = await fetch(fake, store, descriptor(URL), ("mcr.example",), ALICE)
    assert size == len(LAYER.tar) and store.layer_path(LAYER.diff_id).read_bytes() == LAYER.tar
    sent, = fake.to("mcr.example")
    assert "authorization" not in sent.headers


@pytest.mark.anyio
async def test_a_host_not_allowed_is_never_asked_even_through_a_redirect(store):
    fake = FakeRegistry()
    metadata = "http://169.254.169.254/latest/meta-data/"
    foreign_host(fake, {URL: httpx.Response(302, headers={"Location": metadata}),
                        metadata: streamed(LAYER.blob)})
    with pytest.raises(Unsupported) as info:
        await fetch(fake, store, descriptor(URL, "http://10.0.0.1/layer"), (".example",))
    assert fake.to("169.254.169.254") == [] and fake.to("10.0.0.1") == []
    assert "169.254.169.254 is not allowed" in info.value.message and "10.0.0.1 is not allowed" in info.value.message


@pytest.mark.anyio
async def test_allowed_redirects_are_followed(store):
    fake = FakeRegistry()
    blob_url = "https://blobs.mcr.example/sha256/abc?sig=secret-signature"
    foreign_host(fake, {URL: httpx.Response(307, headers={"Location": blob_url}),
                        blob_url.split("?")[0]: streamed(LAYER.blob)})
    assert await fetch(fake, store, descriptor(URL), (".mcr.example", "mcr.example")) == len(LAYER.tar)


@pytest.mark.anyio
async def test_bytes_from_a_url_are_verified_like_any_blob(store):
    fake = FakeRegistry()
    foreign_host(fake, {URL: streamed(gzip.compress(b"not the layer", mtime=0))})
    with pytest.raises(InvalidContent, match="does not match its digest"):
        await fetch(fake, store, descriptor(URL), ("*",))
    assert not store.layer_path(LAYER.diff_id).exists()


@pytest.mark.anyio
async def test_the_registry_serves_it_when_the_urls_do_not(store):
    fake = FakeRegistry()
    fake.add_blob(LAYER.blob)
    foreign_host(fake, {})  # the URL answers 404
    assert await fetch(fake, store, descriptor(URL), ("*",)) == len(LAYER.tar)
    assert len(fake.to("mcr.example")) == 1
    # And a registry that mirrors foreign layers needs no setting at all.
    assert await fetch(fake, Store(store.root.parent / "other"), descriptor(URL), ()) == len(LAYER.tar)


@pytest.mark.anyio
async def test_when_nothing_gives_it_every_url_says_why(store):
    fake = FakeRegistry()
    foreign_host(fake, {URL: httpx.Response(503)})
    with pytest.raises(Unsupported) as info:
        await fetch(fake, store, descriptor(URL, "ftp://mcr.example/layer"), ("*",))
    assert f"{URL}: HTTP 503" in info.value.message and "ftp://mcr.example/layer: not an http(s) URL" in info.value.message


def test_manifest_descriptors_keep_their_urls():
    manifest = {"schemaVersion": 2, "mediaType": mf.DOCKER_MANIFEST,
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:" + "a" * 64,
                           "size": 2},
                "layers": [{"mediaType": FOREIGN, "digest": LAYER.digest, "size": LAYER.size, "urls": [URL]},
                           {"mediaType": mf.OCI_MANIFEST.replace("manifest", "layer").replace("+json", ".tar+gzip"),
                            "digest": LAYER.digest, "size": LAYER.size}]}
    import json
    layers = mf.parse_image_manifest(json.dumps(manifest).encode()).layers
    assert layers[0].urls == (URL,) and layers[0].foreign and not layers[1].foreign


@pytest.mark.parametrize("url, problem", [
    ("https://mcr.example/x", None), ("https://user:pw@mcr.example/x", "carries credentials"),
    ("file:///etc/passwd", "not an http(s) URL"), ("https://mcr.example:99999/x", "not a URL"),
    ("https://evil.example/x", "evil.example is not allowed")])
def test_url_rules(url, problem):
    found = url_problem(url, ("mcr.example",))
    assert (found is None) if problem is None else (problem in found)


def test_host_rules_and_the_setting():
    assert host_allowed("a.b.example", (".example",)) and not host_allowed("example", (".example",))
    assert host_allowed("MCR.example.", ("mcr.example",))
    assert load_settings({}).foreign_layer_hosts == ()
    assert load_settings({"ALLOW_FOREIGN_LAYERS": "yes"}).foreign_layer_hosts == ("*",)
    assert load_settings({"ALLOW_FOREIGN_LAYERS": "MCR.example, .windows.example"}).foreign_layer_hosts == (
        "mcr.example", ".windows.example")
    with pytest.raises(SettingsError, match="ALLOW_FOREIGN_LAYERS"):
        load_settings({"ALLOW_FOREIGN_LAYERS": "http://mcr.example"})
