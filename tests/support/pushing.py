"""Push test images through the registry V2 API: monolithic blob uploads plus a manifest PUT, all with httpx."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import httpx

from tests.support.images import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    Auth,
    Flavour,
    Layer,
    make_config,
    sha,
)

HTTP_TIMEOUT = httpx.Timeout(60.0, connect=5.0)


@dataclass(frozen=True)
class PushedImage:
    repository: str
    tag: str | None
    manifest: bytes  # exact bytes PUT
    manifest_digest: str
    config: bytes
    config_digest: str
    layers: tuple[Layer, ...]
    media_type: str = DOCKER_MANIFEST  # of the manifest

    @property
    def reference(self) -> str:
        """``repo:tag`` if tagged, else ``repo@digest``."""
        if self.tag is not None:
            return f"{self.repository}:{self.tag}"
        return f"{self.repository}@{self.manifest_digest}"


def _client(auth: Auth) -> httpx.Client:
    # trust_env=False: loopback traffic must never go through an environment proxy.
    return httpx.Client(auth=auth, timeout=HTTP_TIMEOUT, trust_env=False)


def _check(response: httpx.Response, what: str) -> httpx.Response:
    if not response.is_success:
        raise RuntimeError(
            f"{what}: {response.request.method} {response.request.url} answered "
            f"{response.status_code}: {response.text[:2000]}"
        )
    return response


def push_blob(base_url: str, repository: str, data: bytes, *, auth: Auth = None) -> str:
    """Monolithic upload of ``data`` (skipped if already present); returns its digest."""
    with _client(auth) as client:
        return _push_blob(client, base_url.rstrip("/"), repository, data)


def _push_blob(client: httpx.Client, base_url: str, repository: str, data: bytes) -> str:
    digest = sha(data)
    head = client.head(f"{base_url}/v2/{repository}/blobs/{digest}")
    if head.status_code == 200:
        return digest
    started = _check(
        client.post(f"{base_url}/v2/{repository}/blobs/uploads/"), "start blob upload"
    )
    location = started.headers.get("Location")
    if not location:
        raise RuntimeError(f"blob upload start gave no Location header: {started.headers}")
    # Location may be relative or absolute and usually already has a query (_state=…).
    upload_url = httpx.URL(base_url + "/").join(location).copy_merge_params({"digest": digest})
    _check(
        client.put(
            upload_url,
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        ),
        f"upload blob {digest}",
    )
    return digest


def _put_manifest(
    client: httpx.Client,
    base_url: str,
    repository: str,
    reference: str,
    body: bytes,
    media_type: str,
) -> str:
    digest = sha(body)
    response = _check(
        client.put(
            f"{base_url}/v2/{repository}/manifests/{reference}",
            content=body,
            headers={"Content-Type": media_type},
        ),
        f"put manifest {repository}:{reference}",
    )
    # The registry must have stored exactly our bytes.
    answered = response.headers.get("Docker-Content-Digest")
    if answered is not None and answered != digest:
        raise RuntimeError(f"registry stored manifest as {answered}, expected {digest}")
    return digest


def _descriptor(media_type: str, data_digest: str, size: int, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": data_digest, "size": size, **extra}


def push_image(
    base_url: str,
    repository: str,
    tag: str | None,
    layers: Sequence[Layer],
    config: bytes | None = None,
    *,
    flavour: Flavour = "docker",
    auth: Auth = None,
    **config_kwargs: Any,
) -> PushedImage:
    """Push layers, config and a single-platform manifest; tag it (or not, if tag is None).

    ``config_kwargs`` go to ``make_config`` when ``config`` is not given.
    """
    if config is None:
        config = make_config(layers, **config_kwargs)
    elif config_kwargs:
        raise TypeError("pass either config bytes or make_config keyword arguments")
    base_url = base_url.rstrip("/")
    if flavour == "docker":
        manifest_type, config_type = DOCKER_MANIFEST, DOCKER_CONFIG
    elif flavour == "oci":
        manifest_type, config_type = OCI_MANIFEST, OCI_CONFIG
    else:
        raise ValueError(f"unknown flavour {flavour!r}")

    document = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": _descriptor(config_type, sha(config), len(config)),
        "layers": [
            _descriptor(layer.media_type_for(flavour), layer.digest, layer.size)
            for layer in layers
        ],
    }
    # Pretty-printed like docker does, so code under test that re-serialises
    # manifests (instead of keeping the bytes) gets caught by digest checks.
    manifest = json.dumps(document, indent=3).encode()
    with _client(auth) as client:
        for layer in layers:
            _push_blob(client, base_url, repository, layer.blob)
        config_digest = _push_blob(client, base_url, repository, config)
        manifest_digest = _put_manifest(
            client, base_url, repository, tag or sha(manifest), manifest, manifest_type
        )
    return PushedImage(
        repository=repository,
        tag=tag,
        manifest=manifest,
        manifest_digest=manifest_digest,
        config=config,
        config_digest=config_digest,
        layers=tuple(layers),
        media_type=manifest_type,
    )


def push_index(
    base_url: str,
    repository: str,
    tag: str | None,
    entries: Sequence[tuple[PushedImage, Mapping[str, str]]],
    *,
    flavour: Flavour = "docker",
    auth: Auth = None,
) -> tuple[bytes, str]:
    """Push a manifest list (docker) or image index (oci) over already-pushed images.

    Each entry is ``(image, platform)`` with platform like
    ``{"architecture": "arm", "os": "linux", "variant": "v7"}``. Children that
    live in another repository are copied into ``repository`` by digest first.
    Returns ``(index bytes, index digest)``.
    """
    if flavour not in ("docker", "oci"):
        raise ValueError(f"unknown flavour {flavour!r}")
    base_url = base_url.rstrip("/")
    index_type = DOCKER_MANIFEST_LIST if flavour == "docker" else OCI_INDEX
    document = {
        "schemaVersion": 2,
        "mediaType": index_type,
        "manifests": [
            _descriptor(
                image.media_type,
                image.manifest_digest,
                len(image.manifest),
                platform=dict(platform),
            )
            for image, platform in entries
        ],
    }
    index = json.dumps(document, indent=3).encode()
    with _client(auth) as client:
        for image, _platform in entries:
            if image.repository != repository:
                for layer in image.layers:
                    _push_blob(client, base_url, repository, layer.blob)
                _push_blob(client, base_url, repository, image.config)
                _put_manifest(
                    client, base_url, repository, image.manifest_digest,
                    image.manifest, image.media_type,
                )
        digest = _put_manifest(
            client, base_url, repository, tag or sha(index), index, index_type
        )
    return index, digest
