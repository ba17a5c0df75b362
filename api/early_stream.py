"""Starting the response before the preparation is done, so a switch does not give up waiting for headers.

IOS-XE's HTTP client drops a request whose response headers take longer than 30 s (its default), and a cold
1 GB image takes longer to prepare. After PREPARE_GRACE seconds we therefore answer with the exact
Content-Length, computed without unpacking anything (`plan_before_ready`):
  - a layer already in the store: its file size;
  - an uncompressed layer: its descriptor size;
  - a gzip layer: the ISIZE trailer (last 4 bytes of the blob, one ranged request, asked once per process by
    `SizeGuesses`); it is the size modulo 4 GiB of the last gzip member only, so a wrong guess is possible —
    and is caught when the layer is read.
The bytes then go out through the same `archive_stream` as a warm download, behind an `EarlyGate`: each layer
once the preparation has verified and stored it, `manifest.json` and `repositories` last, only after the whole
image verified. Any failure or size surprise after the headers closes the connection early, so a client can
only ever hold a short file that `docker load` rejects, never a wrong one that loads.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from typing import Awaitable, Callable

from docker_http_passthrough.api.preparation import JobState
from docker_http_passthrough.shared import manifest as mf
from docker_http_passthrough.shared.archive import ArchivePlan, LayerFile, plan_archive
from docker_http_passthrough.shared.errors import PassthroughError
from docker_http_passthrough.shared.registry import RegistryClient
from docker_http_passthrough.shared.store import Store

POLL = 0.25
# Sizes past this cannot be told from ISIZE (it wraps at 4 GiB): wait for the preparation instead.
ISIZE_LIMIT = 1 << 32
SIZE_GUESSES_KEPT = 4096


class EarlyStreamAborted(Exception):
    """Raised inside the response body: the server closes the connection, the client holds a short file."""


class SizeGuesses:
    """Blob digest → the layer size its gzip trailer promises, asked once however many clients wait on the same
    image. One per API process (the app owns it); bounded."""

    def __init__(self, limit: int = SIZE_GUESSES_KEPT):
        self.limit = limit
        self.asked: dict[str, asyncio.Future] = {}

    async def gzip_size(self, client: RegistryClient, layer: mf.Descriptor) -> int | None:
        asked = self.asked.get(layer.digest)
        if asked is None:
            asked = asyncio.ensure_future(_ask_isize(client, layer))
            self.asked[layer.digest] = asked
            if len(self.asked) > self.limit:
                self.asked.pop(next(iter(self.asked)))
        try:
            return await asyncio.shield(asked)
        except PassthroughError:
            self.asked.pop(layer.digest, None)  # another client's credentials may do better
            return None


async def _ask_isize(client: RegistryClient, layer: mf.Descriptor) -> int | None:
    if layer.size < 18 or layer.size >= ISIZE_LIMIT:
        return None
    tail = await client.blob_range(layer.digest, layer.size - 4, 4)
    if tail is None:
        return None
    isize = struct.unpack("<I", tail)[0]
    # A tar is a whole number of 512-byte blocks; anything else means ISIZE does not describe the layer.
    return isize if isize and isize % 512 == 0 else None


async def _stored_blob(store: Store, registry: str, repository: str, digest: str, wait: float) -> bytes | None:
    """Manifest and config are the first things a preparation stores; wait briefly for them."""
    for _ in range(int(wait / POLL) + 1):
        if store.seen(registry, repository, digest):
            data = store.get_blob(digest)
            if data is not None:
                return data
        await asyncio.sleep(POLL)
    return None


@dataclass(frozen=True)
class EarlyPlan:
    plan: ArchivePlan
    layers: list[tuple[str, str]]  # (blob digest, diff_id), bottom to top

    @property
    def diff_ids(self) -> list[str]:
        return [diff_id for _digest, diff_id in self.layers]


async def plan_before_ready(client: RegistryClient, store: Store, guesses: SizeGuesses, manifest_digest: str,
                            repo_tag: str) -> EarlyPlan | None:
    """The archive's plan with sizes known before unpacking; None when some size cannot be known."""
    registry, repository = client.target.api_url, client.repository
    manifest_data = await _stored_blob(store, registry, repository, manifest_digest, wait=5.0)
    if manifest_data is None:
        return None
    manifest = mf.parse_image_manifest(manifest_data)
    config = await _stored_blob(store, registry, repository, manifest.config.digest, wait=5.0)
    if config is None:
        return None
    diff_ids = mf.diff_ids_of(config)
    files = []
    for layer, diff_id in zip(manifest.layers, diff_ids):
        path = store.layer_path(diff_id)
        if store.linked_diff_id(layer.digest) == diff_id and path.exists():
            size = path.stat().st_size
        elif layer.media_type in mf.PLAIN_LAYERS:
            size = layer.size
        elif layer.media_type in mf.ZSTD_LAYERS:
            return None  # a zstd blob says its size nowhere that one small read can reach
        else:
            size = await guesses.gzip_size(client, layer)
            if size is None:
                return None
        files.append(LayerFile(diff_id, size, str(path)))
    try:
        plan = plan_archive(config, manifest.config.digest, files, repo_tag)
    except ValueError:
        return None
    return EarlyPlan(plan, [(layer.digest, diff_id) for layer, diff_id in zip(manifest.layers, diff_ids)])


@dataclass(frozen=True)
class _Checkpoint:
    end: int  # bytes before this offset need…
    ready: Callable[[], bool]  # …this to be true
    what: str


class EarlyGate:
    """Holds the archive back as far as the preparation has not verified it: a layer (with the headers before
    it) once this preparation verified it for this registry and repository — a file that merely exists may
    belong to another registry's image — and the closing files once the whole image did."""

    def __init__(self, early: EarlyPlan, store: Store, registry: str, repository: str,
                 job_state: Callable[[], Awaitable[JobState]], image_ready: Callable[[], bool], timeout: float):
        def verified(digest: str, diff_id: str) -> Callable[[], bool]:
            return lambda: (store.linked_diff_id(digest) == diff_id and store.seen(registry, repository, digest)
                            and store.layer_path(diff_id).exists())

        file_segments = [segment for segment in early.plan.segments if segment.path is not None]
        self.checkpoints = [_Checkpoint(segment.offset + segment.length, verified(digest, diff_id), f"layer {digest}")
                            for segment, (digest, diff_id) in zip(file_segments, early.layers, strict=True)]
        self.checkpoints.append(_Checkpoint(early.plan.size, image_ready, "the image to verify"))
        self.passed = 0  # checkpoints before this one are open
        self.job_state = job_state
        self.deadline = asyncio.get_running_loop().time() + timeout

    async def __call__(self, position: int) -> int:
        while self.checkpoints[self.passed].end <= position:
            self.passed += 1
        checkpoint = self.checkpoints[self.passed]
        await self._wait_for(checkpoint)
        return checkpoint.end

    async def _wait_for(self, checkpoint: _Checkpoint) -> None:
        loop = asyncio.get_running_loop()
        while not checkpoint.ready():
            state = await self.job_state()
            if state.state == "failed":
                raise EarlyStreamAborted(f"preparation failed after the response started: {state.error.message}")
            if state.ended and not checkpoint.ready():
                raise EarlyStreamAborted(f"the preparation ended without {checkpoint.what} in the store")
            if loop.time() > self.deadline:
                raise EarlyStreamAborted(f"gave up waiting for {checkpoint.what}")
            await asyncio.sleep(POLL)
