"""Manifest media types and parsing: Docker schema2 and OCI manifests, manifest lists and indexes, and the
layer list of an image config."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from docker_http_passthrough.shared import platforms
from docker_http_passthrough.shared.errors import LimitExceeded, InvalidContent, NotFound, Unsupported
from docker_http_passthrough.shared.platforms import Platform

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json", "application/vnd.docker.distribution.manifest.v1+prettyjws")

# At most this many URLs of a foreign layer are tried.
URLS_KEPT = 8
# At most this many platforms are listed in a platform_not_found answer.
PLATFORMS_LISTED = 64
# Set on index entries that are not images but refer to one (BuildKit attestation manifests).
REFERENCE_TYPE = "vnd.docker.reference.type"

IMAGE_MANIFESTS = (DOCKER_MANIFEST, OCI_MANIFEST)
INDEXES = (DOCKER_MANIFEST_LIST, OCI_INDEX)
# Sent on HEAD too: without it distribution 2.8 converts to schema1 and reports a different digest.
ACCEPT = ", ".join(IMAGE_MANIFESTS + INDEXES)

GZIP_LAYERS = frozenset({
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
})
ZSTD_LAYERS = frozenset({
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
})
# Windows base layers and other blobs whose licence keeps registries from serving them: the descriptor's `urls`
# say where they live.
FOREIGN_LAYERS = frozenset({
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
})
PLAIN_LAYERS = frozenset({
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
})


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    urls: tuple[str, ...] = ()  # where a foreign (non-distributable) layer may be fetched from instead

    @property
    def foreign(self) -> bool:
        return self.media_type in FOREIGN_LAYERS or bool(self.urls)


@dataclass(frozen=True)
class ImageManifest:
    config: Descriptor
    layers: tuple[Descriptor, ...]


def compression_of(layer: Descriptor) -> str | None:
    """"gzip", "zstd", or None for an uncompressed layer (parse_image_manifest refused any other type)."""
    if layer.media_type in GZIP_LAYERS:
        return "gzip"
    return "zstd" if layer.media_type in ZSTD_LAYERS else None


def check_supported(media_type: str) -> None:
    if media_type in SCHEMA1:
        raise Unsupported("the registry only offers a Docker schema1 manifest for this image; schema1 is not supported "
                          "(push the image again with a current Docker or any OCI tool)")
    if media_type not in IMAGE_MANIFESTS + INDEXES:
        raise Unsupported(f"unsupported manifest media type {media_type!r}")


# OCI digest grammar: algorithm ":" encoded; the store keeps sha256 only.
_DIGEST = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")


def _load(data: bytes) -> dict:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: "[[[[…" nested deeper than the parser goes
        raise InvalidContent("the registry sent a manifest that is not valid JSON") from None
    if not isinstance(doc, dict):
        raise InvalidContent("the registry sent a manifest that is not a JSON object")
    return doc


def _list(doc: dict, field: str) -> list:
    value = doc.get(field)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidContent(f"the manifest's {field!r} is not a list")
    return value


def _descriptor(raw: object) -> Descriptor:
    if not isinstance(raw, dict):
        raise InvalidContent("the manifest has a descriptor that is not a JSON object")
    media_type, digest, size = raw.get("mediaType"), raw.get("digest"), raw.get("size")
    if not isinstance(media_type, str) or not isinstance(digest, str) or type(size) is not int:
        raise InvalidContent("the manifest has a descriptor without mediaType, digest or size")
    if size < 0:
        raise InvalidContent(f"the manifest gives {digest[:80]!r} a negative size")
    if not _SHA256.fullmatch(digest):
        if _DIGEST.fullmatch(digest):
            raise Unsupported(f"digest {digest[:80]!r}: only sha256 digests are supported")
        raise InvalidContent(f"the manifest has a malformed digest {digest[:80]!r}")
    urls = raw.get("urls")  # a foreign layer's; bounded, as a hostile manifest could list anything
    urls = tuple(u for u in urls[:URLS_KEPT] if isinstance(u, str) and len(u) <= 2048) if isinstance(urls, list) else ()
    return Descriptor(media_type, digest, size, urls)


def media_type_of(data: bytes, fallback: str) -> str:
    """The media type a manifest declares in its body; the Content-Type header is the fallback (OCI allows both)."""
    declared = _load(data).get("mediaType")
    return declared if isinstance(declared, str) and declared else fallback


def parse_image_manifest(data: bytes) -> ImageManifest:
    doc = _load(data)
    if doc.get("schemaVersion") == 1:
        check_supported(SCHEMA1[0])
    if "manifests" in doc:
        raise InvalidContent("expected an image manifest but got an index")
    layers = tuple(_descriptor(layer) for layer in _list(doc, "layers"))
    for layer in layers:
        if layer.media_type not in GZIP_LAYERS | ZSTD_LAYERS | PLAIN_LAYERS:
            raise Unsupported(f"layer {layer.digest} has media type {layer.media_type[:100]!r}; "
                              "only gzip, zstd and uncompressed tar layers are supported")
    return ImageManifest(config=_descriptor(doc.get("config")), layers=layers)


def diff_ids_of(config: bytes) -> list[str]:
    """The layers' diff_ids an image config lists (`rootfs.diff_ids`), bottom to top."""
    try:
        diff_ids = json.loads(config)["rootfs"]["diff_ids"]
        assert isinstance(diff_ids, list) and all(isinstance(d, str) for d in diff_ids)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise InvalidContent("the image config has no rootfs.diff_ids list") from None
    return diff_ids


def index_platforms(index: bytes) -> list[tuple[dict, str]]:
    """The image entries of an index with their platforms as the registry spells them, in index order.

    BuildKit's attestation manifests (platform unknown/unknown) describe an image and are none: left out."""
    entries = []
    for entry in _list(_load(index), "manifests"):
        if not isinstance(entry, dict):
            raise InvalidContent("the index has an entry that is not a JSON object")
        annotations = entry.get("annotations")
        if isinstance(annotations, dict) and annotations.get(REFERENCE_TYPE):
            continue
        plat = entry.get("platform") if isinstance(entry.get("platform"), dict) else {}
        entries.append((entry, platforms.spelled(plat)))
    return entries


def platform_not_found(wanted: Platform, available: list[str]) -> NotFound:
    """404 naming the platform asked for and listing the ones the image has (also as a JSON field); bounded, as
    a hostile index could list anything."""
    available = [spelling[:100] for spelling in available[:PLATFORMS_LISTED]]
    listed = ", ".join(available) or "none"
    listed = listed if len(listed) <= 300 else listed[:300] + "…"
    return NotFound(f"the image has no {wanted} variant (offered: {listed})",
                    code="platform_not_found", details={"platform": str(wanted), "platforms": available})


def select_platform(index: bytes, wanted: Platform) -> Descriptor:
    """Pick the manifest for `wanted` by its platform field, never by position. An exact match (after
    normalising, see `platforms`) wins; a request without a variant otherwise takes the first entry of its
    os and architecture (linux/arm on an index with only arm/v6)."""
    entries = index_platforms(index)
    fits = [platforms.fit(platforms.offered(entry.get("platform")), wanted) for entry, _spelling in entries]
    if any(fits):
        return _descriptor(entries[fits.index(max(fits))][0])  # index() gives the first of the best
    raise platform_not_found(wanted, [spelling for _entry, spelling in entries])


def check_config_platform(config: bytes, wanted: Platform) -> None:
    """A single-platform image serves only the platform its config names (a config that names none serves
    any): an arm64 image asked for as linux/amd64 is a 404 naming linux/arm64, never an image that cannot run."""
    try:
        doc = json.loads(config)
    except (ValueError, RecursionError):
        raise InvalidContent("the image config is not valid JSON") from None
    have = platforms.offered(doc)
    if have is None or platforms.fit(have, wanted):
        return
    raise platform_not_found(wanted, [platforms.spelled(doc)])


def check_limits(manifest: ImageManifest, max_layers: int, max_bytes: int) -> None:
    """Before anything else is fetched: an image past IMAGE_MAX_LAYERS or IMAGE_MAX_BYTES is refused."""
    if len(manifest.layers) > max_layers:
        raise LimitExceeded(f"the image has {len(manifest.layers)} layers, more than IMAGE_MAX_LAYERS={max_layers}")
    size = manifest.config.size + sum(layer.size for layer in manifest.layers)
    if size > max_bytes:
        raise LimitExceeded(f"the image's blobs take {size} bytes, more than IMAGE_MAX_BYTES={max_bytes}")
