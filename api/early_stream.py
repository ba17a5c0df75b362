"""Starting a cold download's response before its preparation is done, with the exact Content-Length.

IOS-XE's HTTP client drops a request whose response headers take longer than 30 s (its default), and a device
with a short idle timeout drops a transfer that pauses. So a cold GET waits for its image only PREPARE_GRACE
(default 1 s: a small image is served whole, or its failure answered as JSON); then the headers go out as soon as
the archive's exact length is known, and each layer's bytes follow as the preparation inflates it (`early_gate`).
The length is known without unpacking anything (`plan_before_ready`):
  - a layer already in the store: its file's size;
  - an uncompressed layer: its descriptor's size;
  - a gzip layer: what the blob's tail says (`size_probes`, `shared.gzip_tail`) — counted for a small blob, its
    ISIZE trailer for a blob of one member; a blob of several members (or a registry that ignores Range), and a
    zstd layer, are waited for until the preparation has unpacked them.
The manifest and config come from the preparation, which stores them first. A preparation that fails before the
headers went out gives the request its JSON error; one that finishes first gives an ordinary (warm) response.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from docker_http_passthrough.api.preparation import PreparationWatch
from docker_http_passthrough.api.size_probes import SizeGuesses
from docker_http_passthrough.shared import manifest as mf
from docker_http_passthrough.shared.archive import ArchivePlan, LayerFile, plan_archive
from docker_http_passthrough.shared.errors import InvalidContent
from docker_http_passthrough.shared.registry import RegistryClient
from docker_http_passthrough.shared.store import Store

log = logging.getLogger("docker_http_passthrough.api")

POLL = 0.1
# Size probes (a ranged request per gzip layer) start this long before the grace ends, or half-way through a
# shorter grace: an image prepared by then costs none, and the headers of one with many layers (a few round trips
# of 16 probes) still come within seconds of the grace.
PROBE_LEAD = 2.0
# The response starts only once the preparation runs: a job that waits in the queue while no worker is alive
# must still get its JSON 504 (no_worker). A job kept queued by busy workers starts its response after this long.
QUEUED_AT_MOST = 10.0


@dataclass(frozen=True)
class PlannedLayer:
    digest: str  # the blob's
    diff_id: str
    size: int  # of the layer tar, as announced


@dataclass(frozen=True)
class EarlyPlan:
    plan: ArchivePlan
    layers: tuple[PlannedLayer, ...]  # bottom to top

    @property
    def diff_ids(self) -> list[str]:
        return [layer.diff_id for layer in self.layers]


async def _stored_blob(store: Store, registry: str, repository: str, digest: str,
                       watch: PreparationWatch) -> bytes | None:
    """A manifest or config the preparation stores first; None when the preparation ended meanwhile."""
    while True:
        ended = await watch.outcome() is not None  # raises the preparation's error
        if store.seen(registry, repository, digest):
            data = store.get_blob(digest)
            if data is not None:
                return data
        if ended:
            return None
        await asyncio.sleep(POLL)


def _stored_size(store: Store, diff_id: str) -> int | None:
    try:
        return store.layer_path(diff_id).stat().st_size
    except FileNotFoundError:
        return None


async def _size_up_front(client: RegistryClient, store: Store, guesses: SizeGuesses, layer: mf.Descriptor,
                         diff_id: str) -> int | None:
    stored = _stored_size(store, diff_id)
    if stored is not None:
        return stored
    if layer.media_type in mf.PLAIN_LAYERS:
        return layer.size
    if layer.media_type in mf.ZSTD_LAYERS:
        log.info("layer %s: size unknown until it is unpacked (zstd)", layer.digest)
        return None  # a zstd blob says its size nowhere that one small read can reach
    found = await guesses.gzip_size(client, layer)
    if found.size is None:
        log.info("layer %s: size unknown until it is unpacked (%s)", layer.digest, found.how)
    return found.size


async def _sizes(client: RegistryClient, store: Store, guesses: SizeGuesses, manifest: mf.ImageManifest,
                 diff_ids: list[str], watch: PreparationWatch, grace_ends: float) -> list[int] | None:
    """Every layer's size: up front where possible (concurrently), else once the layer is unpacked; None when
    the preparation ended first."""
    sizes = list(await asyncio.gather(*(_size_up_front(client, store, guesses, layer, diff_id)
                                        for layer, diff_id in zip(manifest.layers, diff_ids))))
    warned = False
    while None in sizes:
        ended = await watch.outcome() is not None
        sizes = [size if size is not None else _stored_size(store, diff_id) for size, diff_id in zip(sizes, diff_ids)]
        if None not in sizes:
            break
        if ended:
            return None
        if not warned and time.monotonic() > grace_ends:
            warned = True
            log.warning("%s: no headers after PREPARE_GRACE: the sizes of %d layers are only known once they are "
                        "unpacked (pre-warm this image for devices)", client.repository, sizes.count(None))
        await asyncio.sleep(POLL)
    return sizes


async def _held(watch: PreparationWatch, until: float) -> bool:
    """Wait until `until` (monotonic) unless the preparation ends first; True if it did (or failed: raises)."""
    while time.monotonic() < until:
        if await watch.outcome() is not None:
            return True
        await asyncio.sleep(POLL)
    return False


async def _taken_up(watch: PreparationWatch, until: float) -> bool:
    """Wait until the preparation runs (a worker took the job, or this process runs it), or until `until` if it is
    queued while workers are alive; True if it ended meanwhile (or failed: raises)."""
    while True:
        if await watch.outcome() is not None:
            return True
        state = await watch.preparer.state(watch.spec.job_id)
        if state.state in ("running", "done"):
            return False
        if state.state == "queued" and state.problem is None and time.monotonic() >= until:
            return False  # busy workers: it will run
        # Queued with no live worker, or not (yet, or any more) in the queue: the preparer's own wait decides.
        await asyncio.sleep(POLL)


async def plan_before_ready(client: RegistryClient, store: Store, guesses: SizeGuesses, manifest_digest: str,
                            repo_tag: str, watch: PreparationWatch, grace: float) -> EarlyPlan | None:
    """The archive's plan once its exact size is known and PREPARE_GRACE has passed; None when the preparation
    finished first (or the image cannot be planned: the preparation then says why). Raises the preparation's
    error if it failed first: within the grace a small image's failure is still a JSON answer."""
    grace_ends = time.monotonic() + grace
    registry, repository = client.target.api_url, client.repository
    manifest_data = await _stored_blob(store, registry, repository, manifest_digest, watch)
    if manifest_data is None:
        return None
    manifest = mf.parse_image_manifest(manifest_data)
    config = await _stored_blob(store, registry, repository, manifest.config.digest, watch)
    if config is None:
        return None
    try:
        diff_ids = mf.diff_ids_of(config)
    except InvalidContent:
        return None
    if len(diff_ids) != len(manifest.layers):
        return None
    if await _held(watch, grace_ends - min(PROBE_LEAD, grace / 2)):
        return None
    sizes = await _sizes(client, store, guesses, manifest, diff_ids, watch, grace_ends)
    if sizes is None or await _held(watch, grace_ends) or await _taken_up(watch, grace_ends - grace + QUEUED_AT_MOST):
        return None
    files = [LayerFile(diff_id, size, str(store.layer_path(diff_id))) for diff_id, size in zip(diff_ids, sizes)]
    try:
        plan = plan_archive(config, manifest.config.digest, files, repo_tag)
    except ValueError:
        return None
    return EarlyPlan(plan, tuple(PlannedLayer(layer.digest, diff_id, size)
                                 for layer, diff_id, size in zip(manifest.layers, diff_ids, sizes)))
