"""A layer being inflated, readable while it grows: how a cold download sends a layer's bytes as the preparation
writes them, in the same process, another process, or (through the shared volume) on another host.

The writer (`layer_download.fetch_layer`) inflates into its temp file beside the layer's final name
(`Store.atomic_writer`) and publishes how much of it is complete in a small record,
`inflating/<hash of registry, repository, blob digest>.inflating`, holding the diff_id, the temp file's name and
`written`. It rewrites the record (temp + rename: never half-read) every PUBLISH_EVERY seconds while bytes come,
each time only after fdatasync of the temp file: every byte below `written` is on the volume, for a reader on any
host. When the layer verifies, the temp file is linked into place — the same inode, so an open descriptor goes on
reading it — and the record is removed; when the writer fails, both go; when it dies (SIGKILL), both stay until a
re-run's writer replaces the record, and a stream goes on from the new file at the offset it had reached (see
`api.early_gate`, which also checks what it read from a file that did not become the layer).

The record is named by registry, repository and blob, not by diff_id alone: a stream may read only bytes being
fetched for its own registry and repository, the rule the store applies to stored layers (`Store.seen`).

On NFS another host's progress shows up late: the client caches file attributes and directory entries for a few
seconds (acregmin/acdirmin, 3 s and 30 s by default), so a stream there may pause that long between pieces.
Mount the cache volume with `actimeo=1` (or `lookupcache=positive,actimeo=1`) on the API hosts to keep pauses short.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from docker_http_passthrough.shared.digests import digest_hex, name_hash
from docker_http_passthrough.shared.owners import temp_owned_by
from docker_http_passthrough.shared.store import TEMP_MARK, Store

log = logging.getLogger("docker_http_passthrough.store")

PUBLISH_EVERY = 0.2
RECORD_SUFFIX = ".inflating"


def record_path(store: Store, registry: str, repository: str, blob_digest: str) -> Path:
    return store.root / "inflating" / (name_hash(registry, repository, blob_digest) + RECORD_SUFFIX)


def _write_record(path: Path, record: dict) -> None:
    temp = path.with_name(f"{path.name}{TEMP_MARK}{secrets.token_hex(6)}")
    temp.write_text(json.dumps(record))
    os.replace(temp, path)


class GrowingLayer:
    """The writer's side: the record of one temp file being inflated. `wrote` is called by the thread that writes,
    `publish` by anyone (it syncs, then records); `close` removes the record."""

    def __init__(self, store: Store, registry: str, repository: str, blob_digest: str, diff_id: str, out: BinaryIO):
        self.path = record_path(store, registry, repository, blob_digest)
        self.out = out
        self.diff_id = diff_id
        self.file = Path(out.name).name
        self.written = 0  # bytes flushed to the file so far
        self.published = -1
        self.closed = False
        self.lock = threading.Lock()  # a publish running in a thread never re-creates a record close() removed

    def wrote(self, size: int) -> None:
        """`size` bytes are in the file now (the writer flushed them)."""
        self.written = size

    def publish(self) -> None:
        """Make what is written so far durable, then tell readers about it."""
        written = self.written  # read first: the sync covers at least this much
        if written == self.published:
            return
        os.fdatasync(self.out.fileno())
        with self.lock:
            if self.closed:
                return
            _write_record(self.path, {"diff_id": self.diff_id, "file": self.file, "written": written,
                                      "at": time.time()})
            self.published = written

    def close(self) -> None:
        """The layer is in place (or failed): remove the record, if it is still this writer's."""
        with self.lock:
            self.closed = True
            try:
                if json.loads(self.path.read_text()).get("file") == self.file:
                    self.path.unlink()
            except (FileNotFoundError, ValueError):
                pass

    async def keep_publishing(self) -> None:
        """Publish every PUBLISH_EVERY seconds until cancelled (the sync runs in a thread, beside the writer)."""
        while True:
            await asyncio.sleep(PUBLISH_EVERY)
            try:
                await asyncio.to_thread(self.publish)
            except OSError as exc:  # the writer's own fsync will fail and say why; streams wait for the end
                log.warning("cannot publish the progress of %s: %s", self.file, exc)
                return


def remove_records_of(store: Store, owner: str) -> int:
    """Remove the records of a dead writer (`owner`, its process token, is in its temp file's name); returns how
    many. A re-run's writer has replaced the record already if it started: then the record is not the dead one's."""
    removed = 0
    for path in (store.root / "inflating").glob(f"*{RECORD_SUFFIX}"):
        try:
            if temp_owned_by(json.loads(path.read_text()).get("file", ""), owner):
                path.unlink()
                removed += 1
        except (FileNotFoundError, ValueError):
            pass
    return removed


@dataclass(frozen=True)
class Growth:
    """The reader's side: a temp file of the layer and how much of it is complete."""

    path: Path
    written: int


def growth(store: Store, registry: str, repository: str, blob_digest: str, diff_id: str) -> Growth | None:
    """How far the layer `blob_digest` of this registry and repository is inflated now; None if no one writes it."""
    try:
        record = json.loads(record_path(store, registry, repository, blob_digest).read_text())
        file, written = str(record["file"]), int(record["written"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    # The record names a file beside the layer's final name, nothing else.
    if record.get("diff_id") != diff_id or not file.startswith(f"{digest_hex(diff_id)}.tar{TEMP_MARK}") \
            or "/" in file or written < 0:
        return None
    return Growth(store.layer_path(diff_id).with_name(file), written)

