"""Stream an image as a legacy `docker save` tar (Docker 20.10 layout).

Cisco IOS-XE only accepts the legacy layout, so this writes, per layer,
``<id>/``, ``<id>/VERSION``, ``<id>/json`` and ``<id>/layer.tar`` (always a
regular file, never a symlink), then ``<config-hex>.json``, ``manifest.json``
and ``repositories`` (these two last; later code relies on that).

The archive is *planned* first: every header and small file is rendered into
memory and each layer is referenced by (path, size). That gives the exact
``Content-Length`` up front and lets any byte range ``[start, end)`` be
streamed without touching the bytes before ``start``. Output is
deterministic: fixed mtime/uid/gid/modes, and no padding beyond the two
end-of-archive blocks.

The bytes themselves are read by ``archive_reader.ArchiveReader``, the one
way archives are read (HTTP responses and ``write_archive`` alike).
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from docker_http_passthrough.shared.digests import PREFIX, sha256_digest

BLOCK = 512
# ustar stores the size in 11 octal digits.
MAX_MEMBER_SIZE = 8**11 - 1  # 8 GiB - 1

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_EPOCH = "1970-01-01T00:00:00Z"  # what Docker writes for non-top layers
# Docker serialises a zero container.Config with these fields (in this order).
_EMPTY_CONTAINER_CONFIG: dict[str, Any] = {
    "Hostname": "",
    "Domainname": "",
    "User": "",
    "AttachStdin": False,
    "AttachStdout": False,
    "AttachStderr": False,
    "Tty": False,
    "OpenStdin": False,
    "StdinOnce": False,
    "Env": None,
    "Cmd": None,
    "Image": "",
    "Volumes": None,
    "WorkingDir": "",
    "Entrypoint": None,
    "OnBuild": None,
    "Labels": None,
}
# Fields of Docker's V1Image copied from the image config into the top
# layer's json (omitted when absent, like `omitempty`). Go struct order is
# id, parent, comment, created, container, container_config, then these;
# testdata/docker-save-20.10.tar shows it.
_TOP_LAYER_FIELDS = (
    "docker_version",
    "author",
    "config",
    "architecture",
    "variant",
    "os",
)


@dataclass(frozen=True)
class LayerFile:
    diff_id: str  # "sha256:<hex>" from the config's rootfs.diff_ids
    size: int  # bytes of the uncompressed layer tar on disk
    path: str  # file path of the uncompressed layer tar in the store


@dataclass(frozen=True)
class Segment:
    """A contiguous piece of the archive: in-memory ``data`` or a file ``path``."""

    offset: int  # absolute position in the archive
    length: int
    data: bytes | None = None
    path: str | None = None  # when set, the file must be exactly `length` bytes


@dataclass(frozen=True)
class ArchivePlan:
    size: int  # exact total bytes
    segments: tuple[Segment, ...]
    offsets: tuple[int, ...]  # segments[i].offset, for bisect
    layer_ids: tuple[str, ...]  # v1 layer ids, bottom to top
    config_name: str  # "<hex>.json"
    repo_tag: str

    def spans(self, start: int, end: int) -> Iterator[tuple[Segment, int, int]]:
        """Yield (segment, offset within it, length) covering [start, end)."""
        if not 0 <= start <= end <= self.size:
            raise ValueError(f"invalid range [{start}, {end}) for an archive of {self.size} bytes")
        i = bisect_right(self.offsets, start) - 1
        pos = start
        while pos < end:
            seg = self.segments[i]
            lo = pos - seg.offset
            n = min(seg.length - lo, end - pos)
            yield seg, lo, n
            pos += n
            i += 1


def _json(obj: Any) -> bytes:
    # Compact like Go's json.Marshal, so files look like Docker's.
    return json.dumps(obj, separators=(",", ":")).encode()


def _sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _split_repo_tag(repo_tag: str) -> tuple[str, str]:
    # Split at the LAST ':' so a registry port stays in the name.
    name, sep, tag = repo_tag.rpartition(":")
    if not sep or not name or not _TAG_RE.match(tag):
        raise ValueError(f"repo_tag must be 'name:tag', got {repo_tag!r}")
    return name, tag


def _header(name: str, size: int, is_dir: bool = False) -> bytes:
    if size > MAX_MEMBER_SIZE:
        raise ValueError(
            f"{name}: {size} bytes exceeds the ustar limit of {MAX_MEMBER_SIZE} bytes per member"
        )
    info = tarfile.TarInfo(name)
    info.size = 0 if is_dir else size
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.mode = 0o755 if is_dir else 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


def _padding(size: int) -> bytes:
    return bytes(-size % BLOCK)


def _layer_json(config: dict[str, Any], layer_id: str, parent: str, top: bool) -> bytes:
    v1: dict[str, Any] = {"id": layer_id}
    if parent:
        v1["parent"] = parent
    if top:
        # The top layer carries the image's own metadata, as in `docker save`.
        if config.get("comment"):
            v1["comment"] = config["comment"]
        v1["created"] = config.get("created") or _EPOCH
        if config.get("container"):
            v1["container"] = config["container"]
        container_config = config.get("container_config")
        v1["container_config"] = (
            container_config if container_config else _EMPTY_CONTAINER_CONFIG
        )
        for key in _TOP_LAYER_FIELDS:
            if config.get(key):
                v1[key] = config[key]
    else:
        v1["created"] = _EPOCH
        v1["container_config"] = _EMPTY_CONTAINER_CONFIG
        if config.get("os"):
            v1["os"] = config["os"]  # Docker 20.10 tags every layer with the image OS
    return _json(v1)


def _validate(
    config: bytes, config_digest: str, layers: Sequence[LayerFile]
) -> dict[str, Any]:
    if not _DIGEST_RE.match(config_digest):
        raise ValueError(
            f"config_digest must be 'sha256:<64 hex>', got {config_digest!r}"
        )
    actual = sha256_digest(config)
    if actual != config_digest:
        raise ValueError(
            f"config digest mismatch: expected {config_digest}, got {actual}"
        )
    try:
        parsed = json.loads(config)
        diff_ids = parsed["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"config has no rootfs.diff_ids: {exc}") from None
    if not isinstance(diff_ids, list):
        raise ValueError("config rootfs.diff_ids is not a list")  # noqa: TRY004 - bad input, per the API
    if not diff_ids:
        raise ValueError("image has no layers; the legacy layout needs at least one")
    if len(diff_ids) != len(layers):
        raise ValueError(
            f"config lists {len(diff_ids)} layers but {len(layers)} were given"
        )
    for i, (expected, layer) in enumerate(zip(diff_ids, layers)):
        if not isinstance(expected, str) or not _DIGEST_RE.match(expected):
            raise ValueError(
                f"config rootfs.diff_ids[{i}] is not a sha256 digest: {expected!r}"
            )
        if layer.diff_id != expected:
            raise ValueError(
                f"layer {i}: diff_id {layer.diff_id} != config's {expected}"
            )
        if layer.size < 0:
            raise ValueError(f"layer {i}: negative size {layer.size}")
    return parsed


class _Builder:
    """Accumulates segments, merging adjacent in-memory bytes."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []
        self.pending = bytearray()
        self.offset = 0

    def _flush(self) -> None:
        if self.pending:
            data = bytes(self.pending)
            self.segments.append(Segment(self.offset, len(data), data=data))
            self.offset += len(data)
            self.pending.clear()

    def add_bytes(self, data: bytes) -> None:
        self.pending += data

    def add_file(self, path: str, size: int) -> None:
        self._flush()
        if size:
            self.segments.append(Segment(self.offset, size, path=path))
            self.offset += size

    def member(self, name: str, data: bytes) -> None:
        self.add_bytes(_header(name, len(data)) + data + _padding(len(data)))

    def finish(self) -> tuple[Segment, ...]:
        self.add_bytes(bytes(2 * BLOCK))  # end-of-archive marker
        self._flush()
        return tuple(self.segments)


def plan_archive(
    config: bytes, config_digest: str, layers: Sequence[LayerFile], repo_tag: str
) -> ArchivePlan:
    """Lay out the archive without reading any layer file.

    Raises ValueError if the config does not match ``config_digest``, if
    ``layers`` do not match ``rootfs.diff_ids`` (count and order), if a member
    exceeds the ustar size limit, or if ``repo_tag`` is not ``name:tag``.
    """
    parsed = _validate(config, config_digest, layers)
    name, tag = _split_repo_tag(repo_tag)
    config_hex = config_digest.removeprefix(PREFIX)
    config_name = f"{config_hex}.json"

    b = _Builder()
    layer_ids: list[str] = []
    parent = ""
    for i, layer in enumerate(layers):
        top = i == len(layers) - 1
        diff_hex = layer.diff_id.removeprefix(PREFIX)
        # Deterministic and unique per chain; the top id also depends on the
        # config so two images sharing all layers still get distinct ids.
        seed = f"{diff_hex} {parent} {config_digest}" if top else f"{diff_hex} {parent}"
        layer_id = _sha256_hex(seed)
        b.add_bytes(_header(layer_id, 0, is_dir=True))
        b.member(f"{layer_id}/VERSION", b"1.0")
        b.member(f"{layer_id}/json", _layer_json(parsed, layer_id, parent, top))
        # Always the real bytes, even for a repeated layer: no symlinks.
        b.add_bytes(_header(f"{layer_id}/layer.tar", layer.size))
        b.add_file(layer.path, layer.size)
        b.add_bytes(_padding(layer.size))
        layer_ids.append(layer_id)
        parent = layer_id

    b.member(config_name, config)
    manifest = [
        {
            "Config": config_name,
            "RepoTags": [repo_tag],
            "Layers": [f"{lid}/layer.tar" for lid in layer_ids],
        }
    ]
    # Docker writes these two with json.Encoder, hence the trailing newline.
    b.member("manifest.json", _json(manifest) + b"\n")
    b.member("repositories", _json({name: {tag: layer_ids[-1]}}) + b"\n")
    segments = b.finish()
    return ArchivePlan(
        size=b.offset,
        segments=segments,
        offsets=tuple(s.offset for s in segments),
        layer_ids=tuple(layer_ids),
        config_name=config_name,
        repo_tag=repo_tag,
    )
