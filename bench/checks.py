"""What every download is checked against: the first full download of an image, its layout and layer contents
verified against the generated image, then its sha256 and crc32."""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.report import MiB

try:  # igzip: ~15x faster than zlib at level 1 on random data; same gzip format
    from isal import isal_zlib as fastz
except ImportError:  # pragma: no cover
    import zlib as fastz

if TYPE_CHECKING:
    from bench.images import Image



@dataclass
class Reference:
    """A full download whose layout and layer contents were checked against the generated image."""

    path: Path
    size: int
    sha256: str
    crc32: int


def hash_file(path: Path) -> tuple[str, int, int]:
    sha, crc, size = hashlib.sha256(), 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            sha.update(chunk)
            crc = fastz.crc32(chunk, crc)
            size += len(chunk)
    return sha.hexdigest(), crc, size


def verify_archive(path: Path, image: Image) -> None:
    """The download is a docker-save tar whose layer.tar members are exactly the generated layers."""
    layer_hashes: dict[str, str] = {}
    manifest: Any = None
    with tarfile.open(path, mode="r|") as tar:
        for member in tar:
            if member.name.endswith("/layer.tar"):
                reader = tar.extractfile(member)
                sha = hashlib.sha256()
                while chunk := reader.read(4 * MiB):
                    sha.update(chunk)
                layer_hashes[member.name] = "sha256:" + sha.hexdigest()
            elif member.name == "manifest.json":
                manifest = json.load(tar.extractfile(member))
    if not manifest:
        raise AssertionError(f"{path.name}: no manifest.json")
    entry = manifest[0]
    found = [layer_hashes.get(name) for name in entry["Layers"]]
    if found != image.diff_ids:
        raise AssertionError(f"{path.name}: layer contents {found} != generated {image.diff_ids}")
    if entry["Config"] != image.config_digest.removeprefix("sha256:") + ".json":
        raise AssertionError(f"{path.name}: Config {entry['Config']} != {image.config_digest}")


def make_reference(path: Path, image: Image) -> Reference:
    verify_archive(path, image)
    sha, crc, size = hash_file(path)
    return Reference(path, size, sha, crc)


def prefix_crcs(path: Path, lengths: list[int]) -> dict[int, int]:
    """crc32 of the first n bytes of ``path`` for every n in ``lengths``, in one pass."""
    out: dict[int, int] = {}
    crc, pos = 0, 0
    with open(path, "rb") as f:
        for n in sorted(set(lengths)):
            while pos < n:
                chunk = f.read(min(4 * MiB, n - pos))
                if not chunk:
                    break
                crc = fastz.crc32(chunk, crc)
                pos += len(chunk)
            out[n] = crc
    return out


