"""The content-addressed store on the shared volume (CACHE_DIR).

    blobs/sha256/<hex>          manifests, indexes and image configs, byte for byte as the registry sent them
    layers/sha256/<hex>.tar     uncompressed layer tars, named by diff_id, shared by every image that has them
    images/<key>.json           a prepared image: which config and layers make it (written last)
    links/<blob hex>            the diff_id a verified layer blob unpacks to, and the blob's last bytes
    seen/<hash>                 "registry R serves blob D in repository P", confirmed with a request's credentials
    tags/<hash>                 the digest a tag last resolved to, for serving stale when the registry is down
    used/<hex>, leases/<hex>.*  last use and live readers of layers, for eviction (shared/eviction.py)
    inflating/<hash>.inflating  how far a layer being inflated is written (shared/growing_layer.py)
    locks/<name>.lock           embedded mode: file locks between the API processes of one server, and their
                                preparations' progress for /status (shared/locks.py, api/job_files.py); they stay

Sharing content between registries must not widen access: a stored blob or layer is used for (R, P) only
after R confirmed it holds that blob for P, and a layer is reused for a blob digest only when that very blob
was once verified to unpack to it (else anyone running a registry could name a private layer and read it).

Every file is written to a temp file beside its final name, fsynced, then linked into place; a file that
exists is never overwritten (another host may be reading it), and its content is the same anyway. A temp
file's name carries its writer's token (`owners`), so the leftovers of a writer that died can be told apart
from a live writer's file and removed at once. A full volume raises StoreFull (507), and leaves no temp file.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from docker_http_passthrough.shared.archive import LayerFile
from docker_http_passthrough.shared.digests import digest_hex, name_hash, sha256_digest
from docker_http_passthrough.shared.errors import StoreFull
from docker_http_passthrough.shared.owners import TEMP_MARK, process_token, temp_name, temp_owned_by

# A write that fails with one of these means the volume is full (or the quota used up).
FULL = (errno.ENOSPC, errno.EDQUOT)

log = logging.getLogger("docker_http_passthrough.store")
_DIRS = ("blobs/sha256", "layers/sha256", "images", "links", "seen", "tags", "used", "leases", "inflating")


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    def __init__(self, root: str | os.PathLike, owner: str | None = None):
        self.root = Path(root)
        self.owner = owner or process_token()  # named in every temp file this process writes
        for sub in _DIRS:
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # --- paths
    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest_hex(digest)

    def layer_path(self, diff_id: str) -> Path:
        return self.root / "layers" / "sha256" / f"{digest_hex(diff_id)}.tar"

    def image_path(self, key: str) -> Path:
        return self.root / "images" / f"{key}.json"

    # --- writing
    @contextmanager
    def atomic_writer(self, final: Path) -> Iterator[BinaryIO]:
        """A temp file beside `final`; linked into place only if the body finishes without raising."""
        temp = final.with_name(temp_name(final.name, self.owner))
        written = 0
        try:
            with open(temp, "xb") as handle:
                try:
                    yield handle
                    handle.flush()
                    os.fsync(handle.fileno())
                finally:
                    written = os.fstat(handle.fileno()).st_size
            try:
                os.link(temp, final)
            except FileExistsError:
                pass  # same name, same content: someone else finished first
            _fsync_dir(final.parent)
        except OSError as exc:
            if exc.errno in FULL:
                raise self._full(final, written) from None
            raise
        finally:
            temp.unlink(missing_ok=True)

    def _full(self, final: Path, written: int) -> StoreFull:
        try:
            volume = os.statvfs(self.root)
            free = volume.f_bavail * volume.f_frsize
        except OSError:
            free = 0
        return StoreFull(f"the store CACHE_DIR={self.root} is full ({free:,} bytes free) while writing "
                         f"{final.parent.name}/{final.name}: free space on that volume, or set CACHE_MAX_BYTES "
                         "below its size", written=written)

    def put_blob(self, digest: str, data: bytes) -> None:
        if sha256_digest(data) != digest:
            raise ValueError(f"content does not match {digest}")
        path = self.blob_path(digest)
        if not path.exists():
            with self.atomic_writer(path) as handle:
                handle.write(data)

    def _small_file(self, path: Path, text: str) -> None:
        if not path.exists():
            with self.atomic_writer(path) as handle:
                handle.write(text.encode())

    def link_layer(self, blob_digest: str, diff_id: str, blob_size: int, blob_tail: bytes) -> None:
        """Record that `blob_digest` was downloaded and verified to unpack to `diff_id`, with the blob's last
        bytes: asking another registry for them later proves it really holds the blob."""
        digest_hex(diff_id)
        link = {"diff_id": diff_id, "size": blob_size, "tail": blob_tail.hex()}
        self._small_file(self.root / "links" / digest_hex(blob_digest), json.dumps(link, sort_keys=True))

    def layer_link(self, blob_digest: str) -> dict | None:
        try:
            return json.loads((self.root / "links" / digest_hex(blob_digest)).read_text())
        except FileNotFoundError:
            return None

    def linked_diff_id(self, blob_digest: str) -> str | None:
        link = self.layer_link(blob_digest)
        return link["diff_id"] if link else None

    def _seen_path(self, registry: str, repository: str, digest: str) -> Path:
        return self.root / "seen" / name_hash(registry, repository, digest)

    def mark_seen(self, registry: str, repository: str, digest: str) -> None:
        self._small_file(self._seen_path(registry, repository, digest), digest)

    def seen(self, registry: str, repository: str, digest: str) -> bool:
        return self._seen_path(registry, repository, digest).exists()

    def _tag_path(self, registry: str, repository: str, tag: str, platform: str) -> Path:
        return self.root / "tags" / name_hash(registry, repository, tag, platform)

    def remember_tag(self, registry: str, repository: str, tag: str, platform: str, digest: str) -> None:
        path = self._tag_path(registry, repository, tag, platform)
        try:
            if path.read_text() == digest:
                return
        except FileNotFoundError:
            pass
        # Tags move: this file alone is replaced (it is tiny and read whole, so no reader sees half of it).
        temp = path.with_name(temp_name(path.name, self.owner))
        try:
            temp.write_text(digest)
            os.replace(temp, path)
        except OSError as exc:
            if exc.errno not in FULL:
                raise
            # Only stale serving needs it: a full volume must not fail a download over it.
            log.warning("cannot remember tag %s of %s: the store's volume is full", tag, repository)
        finally:
            temp.unlink(missing_ok=True)

    def tag_digest(self, registry: str, repository: str, tag: str, platform: str) -> str | None:
        try:
            return self._tag_path(registry, repository, tag, platform).read_text()
        except FileNotFoundError:
            return None

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

    def layer_bytes(self) -> int:
        total = 0
        for path in (self.root / "layers" / "sha256").iterdir():
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass
        return total

    # --- housekeeping
    def sweep_partials(self, min_age: float = 900.0) -> int:
        """Remove temp files and progress records left by crashed writers; returns how many. Call at start-up.

        Only files untouched for `min_age` seconds: a live writer on another host keeps its files' mtimes fresh.
        """
        removed = 0
        cutoff = time.time() - min_age
        for sub in _DIRS:
            for path in (self.root / sub).iterdir():
                try:
                    if (TEMP_MARK in path.name or sub == "inflating") and path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    pass
        return removed

    def remove_abandoned(self, owner: str) -> int:
        """Remove the temp files of `owner`, a writer known to be dead; returns how many."""
        removed = 0
        for sub in _DIRS:
            for path in (self.root / sub).iterdir():
                if temp_owned_by(path.name, owner):
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed
