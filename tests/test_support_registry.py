"""Prove the test-support parts (registry, proxy, image pushing) work for real."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import images, pushing
from tests.support.images import MANIFEST_ACCEPT, busybox_layer, make_layer
from tests.support.proxy import kind_of
from tests.support.registry import htpasswd_auth
from tests.support.registry_fixtures import RegistryFactory, RegistryUnderTest


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10.0, trust_env=False) as client:
        yield client


def small_layers() -> list[images.Layer]:
    return [
        make_layer({"etc/hello.txt": b"hello\n"}),
        make_layer({"usr/bin/tool": ("exec", b"#!/bin/sh\necho hi\n")}),
    ]


def test_manifest_by_tag_and_digest_through_proxy(
    registry: RegistryUnderTest, unique_repo: str, http: httpx.Client
) -> None:
    image = registry.push_image(unique_repo, "v1", small_layers(), cmd=["/bin/sh"])
    assert image.manifest_digest == images.sha(image.manifest)

    for reference in ("v1", image.manifest_digest):
        response = http.get(
            f"{registry.url}/v2/{unique_repo}/manifests/{reference}",
            headers={"Accept": MANIFEST_ACCEPT},
        )
        assert response.status_code == 200
        assert response.content == image.manifest
        assert response.headers["Docker-Content-Digest"] == image.manifest_digest
        assert response.headers["Content-Type"] == images.DOCKER_MANIFEST


def test_proxy_counts_a_pull_exactly(
    registry: RegistryUnderTest, unique_repo: str, http: httpx.Client
) -> None:
    layers = small_layers()
    image = registry.push_image(unique_repo, "v1", layers)
    registry.proxy.reset()  # pushes went direct, but start clean anyway

    manifest = http.get(
        f"{registry.url}/v2/{unique_repo}/manifests/v1", headers={"Accept": MANIFEST_ACCEPT}
    ).json()
    digests = [manifest["config"]["digest"]] + [d["digest"] for d in manifest["layers"]]
    for digest, expected in zip(digests, [image.config] + [layer.blob for layer in layers]):
        blob = http.get(f"{registry.url}/v2/{unique_repo}/blobs/{digest}")
        assert blob.status_code == 200
        assert blob.content == expected

    proxy = registry.proxy
    assert proxy.count("GET", kind="manifest") == 1
    assert proxy.count("GET", kind="blob") == len(layers) + 1
    assert proxy.count() == len(layers) + 2
    assert proxy.count(path_contains=layers[0].digest) == 1
    assert all(record.status == 200 for record in proxy.requests)


def test_head_manifest_has_length_and_no_body(
    registry: RegistryUnderTest, unique_repo: str, http: httpx.Client
) -> None:
    image = registry.push_image(unique_repo, "v1", small_layers())
    registry.proxy.reset()
    response = http.head(
        f"{registry.url}/v2/{unique_repo}/manifests/v1", headers={"Accept": MANIFEST_ACCEPT}
    )
    assert response.status_code == 200
    assert int(response.headers["Content-Length"]) == len(image.manifest)
    assert response.headers["Docker-Content-Digest"] == image.manifest_digest
    assert response.content == b""
    assert registry.proxy.requests == [("HEAD", f"/v2/{unique_repo}/manifests/v1", 200)]


def test_corrupted_blob_keeps_length_but_not_digest(
    registry: RegistryUnderTest, unique_repo: str, http: httpx.Client
) -> None:
    layer = make_layer({"data.bin": os.urandom(50_000)})
    registry.push_image(unique_repo, "v1", [layer])
    registry.proxy.reset()
    registry.proxy.corrupt_path_contains = layer.digest

    response = http.get(f"{registry.url}/v2/{unique_repo}/blobs/{layer.digest}")
    assert response.status_code == 200
    assert len(response.content) == len(layer.blob)
    assert images.sha(response.content) != layer.digest
    assert sum(a != b for a, b in zip(response.content, layer.blob)) == 1

    registry.proxy.reset()  # clears the fault
    clean = http.get(f"{registry.url}/v2/{unique_repo}/blobs/{layer.digest}")
    assert clean.content == layer.blob


def test_throttled_blob_takes_its_time(
    registry: RegistryUnderTest, unique_repo: str, http: httpx.Client
) -> None:
    data = os.urandom(100_000)
    digest = registry.push_blob(unique_repo, data)
    registry.proxy.reset()
    registry.proxy.throttle_bytes_per_second = 200_000

    started = time.monotonic()
    response = http.get(f"{registry.url}/v2/{unique_repo}/blobs/{digest}")
    elapsed = time.monotonic() - started
    assert response.content == data
    assert elapsed >= 0.4


def test_proxy_injects_error_statuses_and_header_delays(
    registry: RegistryUnderTest, unique_repo: str, http: httpx.Client
) -> None:
    registry.push_image(unique_repo, "v1", small_layers())
    proxy = registry.proxy
    proxy.reset()
    proxy.fail_status = {"/manifests/": 503}
    response = http.get(
        f"{registry.url}/v2/{unique_repo}/manifests/v1", headers={"Accept": MANIFEST_ACCEPT}
    )
    assert response.status_code == 503
    assert response.content == b""
    assert proxy.count(kind="manifest", status=503) == 1

    proxy.reset()
    proxy.delay_seconds_before_headers = 0.3
    started = time.monotonic()
    assert http.get(f"{registry.url}/v2/").status_code == 200
    assert time.monotonic() - started >= 0.3
    assert proxy.count(kind="base") == 1


@pytest.mark.parametrize(
    ("flavour", "index_type"),
    [("docker", images.DOCKER_MANIFEST_LIST), ("oci", images.OCI_INDEX)],
)
def test_pushed_index_is_served_with_its_media_type_and_digest(
    registry: RegistryUnderTest,
    unique_repo: str,
    http: httpx.Client,
    flavour: images.Flavour,
    index_type: str,
) -> None:
    layers = small_layers()
    amd64 = registry.push_image(unique_repo, None, layers, flavour=flavour)
    arm = registry.push_image(
        unique_repo, None, layers, flavour=flavour, architecture="arm", variant="v7"
    )
    index, digest = registry.push_index(
        unique_repo,
        "multi",
        [
            (amd64, {"architecture": "amd64", "os": "linux"}),
            (arm, {"architecture": "arm", "os": "linux", "variant": "v7"}),
        ],
        flavour=flavour,
    )

    head = http.head(
        f"{registry.url}/v2/{unique_repo}/manifests/multi", headers={"Accept": MANIFEST_ACCEPT}
    )
    assert head.status_code == 200
    assert head.headers["Content-Type"] == index_type
    assert head.headers["Docker-Content-Digest"] == digest
    body = http.get(
        f"{registry.url}/v2/{unique_repo}/manifests/{digest}", headers={"Accept": MANIFEST_ACCEPT}
    )
    assert body.content == index
    entries = json.loads(index)["manifests"]
    assert [e["digest"] for e in entries] == [amd64.manifest_digest, arm.manifest_digest]
    assert entries[1]["platform"]["variant"] == "v7"


def test_oci_image_with_busybox_is_served_as_pushed(
    registry: RegistryUnderTest, unique_repo: str, http: httpx.Client
) -> None:
    layer = busybox_layer()
    image = registry.push_image(
        unique_repo, "oci", [layer], flavour="oci", entrypoint=["/bin/echo"], cmd=["hi"]
    )
    response = http.get(
        f"{registry.url}/v2/{unique_repo}/manifests/oci", headers={"Accept": MANIFEST_ACCEPT}
    )
    assert response.headers["Content-Type"] == images.OCI_MANIFEST
    assert response.content == image.manifest
    manifest = response.json()
    assert manifest["config"]["mediaType"] == images.OCI_CONFIG
    assert manifest["layers"][0]["mediaType"] == images.OCI_LAYER_GZIP
    config = json.loads(image.config)
    assert config["rootfs"]["diff_ids"] == [layer.diff_id]
    assert config["config"]["Entrypoint"] == ["/bin/echo"]

    with tarfile.open(fileobj=io.BytesIO(layer.tar)) as archive:
        busybox = archive.getmember("bin/busybox")
        assert busybox.mode == 0o755 and busybox.size > 100_000
        assert archive.getmember("bin/sh").linkname == "busybox"
        assert archive.getmember("bin").isdir()


def test_make_layer_is_deterministic_with_parents() -> None:
    files = {"/a/b/c.txt": b"x", "a/run": ("exec", b"y"), "a/link": ("symlink", "run")}
    first, second = make_layer(files), make_layer(dict(reversed(files.items())))
    assert first == second
    with tarfile.open(fileobj=io.BytesIO(first.tar)) as archive:
        assert archive.getnames() == ["a", "a/b", "a/b/c.txt", "a/link", "a/run"]
        assert all(member.mtime == 0 and member.uid == 0 for member in archive)
    plain = make_layer(files, compression="none")
    assert plain.blob == plain.tar and plain.digest == plain.diff_id
    assert plain.media_type_for("oci") == images.OCI_LAYER_TAR


def test_uploads_through_the_proxy_get_the_proxys_location(
    registry: RegistryUnderTest, unique_repo: str, http: httpx.Client
) -> None:
    registry.proxy.reset()
    started = http.post(f"{registry.url}/v2/{unique_repo}/blobs/uploads/")
    assert started.status_code == 202
    assert started.headers["Location"].startswith(registry.url + "/")

    digest = pushing.push_blob(registry.url, unique_repo, b"through the proxy")
    assert http.get(f"{registry.direct_url}/v2/{unique_repo}/blobs/{digest}").content == (
        b"through the proxy"
    )
    assert registry.proxy.count("PUT", kind="upload") == 1
    assert kind_of(f"/v2/{unique_repo}/blobs/uploads/") == "upload"


def test_htpasswd_registry_refuses_anonymous_and_serves_its_user(
    registry_factory: RegistryFactory, tmp_path: Path, unique_repo: str, http: httpx.Client
) -> None:
    private = registry_factory(
        htpasswd_auth(tmp_path, {"alice": "s3cret"}), push_auth=("alice", "s3cret")
    )
    image = private.push_image(unique_repo, "v1", small_layers())
    url = f"{private.url}/v2/{unique_repo}/manifests/v1"
    assert http.get(url, headers={"Accept": MANIFEST_ACCEPT}).status_code == 401
    authed = http.get(url, headers={"Accept": MANIFEST_ACCEPT}, auth=("alice", "s3cret"))
    assert authed.content == image.manifest
    assert private.proxy.count(kind="manifest") == 2
