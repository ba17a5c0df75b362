"""The content-addressed store on the shared volume (CACHE_DIR).

    blobs/sha256/<hex>          manifests, indexes and image configs, byte for byte as the registry sent them
    layers/sha256/<hex>.tar     uncompressed layer tars, named by diff_id, shared by every image that has them
    images/<key>.json           a prepared image: which config and layers make it (written last)

Every file is written to a temp file beside its final name, fsynced, then linked into place; a file that
exists is never overwritten (another host may be reading it), and its content is the same anyway.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from shared.archive import LayerFile

TEMP_MARK = ".partial-"


@dataclass(frozen=True)
class PreparedLayer:
    diff_id: str
    size: int
    digest: str  # the compressed blob's digest in the registry


@dataclass(frozen=True)
class ImageRecord:
    registry: str
    repository: str
    manifest_digest: str
    config_digest: str
    layers: tuple[PreparedLayer, ...]

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "ImageRecord":
        raw = json.loads(data)
        raw["layers"] = tuple(PreparedLayer(**layer) for layer in raw["layers"])
        return cls(**raw)


def _hex(digest: str) -> str:
    algorithm, _, value = digest.partition(":")
    if algorithm != "sha256" or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(f"unsupported digest {digest!r}")
    return value


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        for sub in ("blobs/sha256", "layers/sha256", "images"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # --- paths
    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / _hex(digest)

    def layer_path(self, diff_id: str) -> Path:
        return self.root / "layers" / "sha256" / f"{_hex(diff_id)}.tar"

    def image_path(self, key: str) -> Path:
        return self.root / "images" / f"{key}.json"

    # --- writing
    @contextmanager
    def atomic_writer(self, final: Path) -> Iterator[BinaryIO]:
        """A temp file beside `final`; linked into place only if the body finishes without raising."""
        temp = final.with_name(f"{final.name}{TEMP_MARK}{secrets.token_hex(6)}")
        try:
            with open(temp, "xb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(temp, final)
            except FileExistsError:
                pass  # same name, same content: someone else finished first
            _fsync_dir(final.parent)
        finally:
            temp.unlink(missing_ok=True)

    def put_blob(self, digest: str, data: bytes) -> None:
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(f"content does not match {digest}")
        path = self.blob_path(digest)
        if not path.exists():
            with self.atomic_writer(path) as handle:
                handle.write(data)

    def put_image(self, key: str, record: ImageRecord) -> None:
        with self.atomic_writer(self.image_path(key)) as handle:
            handle.write(record.to_json())

    # --- reading
    def get_blob(self, digest: str) -> bytes | None:
        try:
            return self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            return None

    def has_layer(self, diff_id: str, size: int | None = None) -> bool:
        try:
            actual = self.layer_path(diff_id).stat().st_size
        except FileNotFoundError:
            return False
        return size is None or actual == size

    def get_image(self, key: str) -> ImageRecord | None:
        """The prepared image, or None when it is not prepared or a part of it has gone."""
        try:
            record = ImageRecord.from_json(self.image_path(key).read_bytes())
        except FileNotFoundError:
            return None
        if not self.blob_path(record.config_digest).exists():
            return None
        if not all(self.has_layer(layer.diff_id, layer.size) for layer in record.layers):
            return None
        return record

    def layer_files(self, record: ImageRecord) -> list[LayerFile]:
        return [LayerFile(layer.diff_id, layer.size, str(self.layer_path(layer.diff_id))) for layer in record.layers]

    # --- housekeeping
    def sweep_partials(self, min_age: float = 900.0) -> int:
        """Remove temp files left by crashed writers; returns how many. Call at start-up.

        Only files untouched for `min_age` seconds: a live writer on another host keeps its file's mtime fresh.
        """
        removed = 0
        cutoff = time.time() - min_age
        for sub in ("blobs/sha256", "layers/sha256", "images"):
            for path in (self.root / sub).iterdir():
                try:
                    if TEMP_MARK in path.name and path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    pass
        return removed
