"""The download routes: filename → image → prepared archive, streamed with an exact Content-Length.

GET and HEAD answer the archive (Range and If-Range for resuming); POST starts the preparation and answers
202 with a status URL, for warming the cache before a rollout.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from docker_http_passthrough.api.client_auth import CHALLENGE
from docker_http_passthrough.api.early import plan_before_ready, stream_as_prepared
from docker_http_passthrough.api.ranges import UnsatisfiableRange, requested_range
from docker_http_passthrough.api.resolution import (
    ImageRequest,
    Resolution,
    image_attributes,
    parse_image_request,
    resolve,
)
from docker_http_passthrough.shared.archive import ArchivePlan, ArchiveReader, plan_archive
from docker_http_passthrough.shared.errors import Forbidden, PassthroughError, Unauthorized
from docker_http_passthrough.shared.eviction import leased, record_use
from docker_http_passthrough.shared.jobs import JobSpec
from docker_http_passthrough.shared.name import repo_tag
from docker_http_passthrough.shared.prepare import job_id_for
from docker_http_passthrough.shared.registry import RegistryClient
from docker_http_passthrough.shared.store import ImageRecord, Store

log = logging.getLogger("docker_http_passthrough.api")
# Bump when the archive bytes for the same image change (it is part of the ETag).
ARCHIVE_LAYOUT = "docker-save-legacy-1"


def error_response(exc: PassthroughError, *, challenge: bool = False) -> JSONResponse:
    headers = {"WWW-Authenticate": CHALLENGE} if challenge else None
    return JSONResponse(exc.to_dict(), status_code=exc.status, headers=headers)


def refusal_response(exc: PassthroughError, wanted: ImageRequest | None, may_challenge: bool) -> JSONResponse:
    """401 with a Basic challenge whenever the client sent no credentials and could send some: a switch with
    `ip http client username/password` configured only sends them after a challenge."""
    sent = wanted is not None and wanted.client_credentials is not None
    if may_challenge and not sent and isinstance(exc, (Unauthorized, Forbidden)):
        if isinstance(exc, Forbidden):
            exc = Unauthorized(f"{exc.message}; send your own registry credentials (HTTP Basic)")
        return error_response(exc, challenge=True)
    return error_response(exc)


def _may_challenge(request: Request) -> bool:
    settings = request.app.state.settings
    return request.url.path.startswith("/registry-auth/") or settings.registry_client_auth != "off"


def _spec(wanted: ImageRequest, resolution: Resolution) -> JobSpec:
    return JobSpec(wanted.target.to_dict(), wanted.image.repository, resolution.digest, wanted.auth.source)


def _note(request: Request, **download: object) -> None:
    """What the access log line and the route span say about this download."""
    request.state.download = {**getattr(request.state, "download", {}), **download}


async def download(request: Request) -> Response:
    state = request.app.state
    started = time.monotonic()
    wanted = None
    attributes: dict = {}
    request.state.span_attributes = attributes
    try:
        wanted = parse_image_request(request)
        attributes.update(image_attributes(request, wanted))
        _note(request, image=f"{wanted.target.name}/{wanted.image.repository}:{wanted.image.tag}")
        resolution = await resolve(request, wanted)
        name = repo_tag(wanted.image, registry_host=wanted.target.repo_tag_host)
        record = state.store.get_image(resolution.key)
        cached = record is not None
        attributes.update({"oci.manifest.digest": resolution.digest, "dhp.cache.hit": cached,
                           "dhp.job.id": job_id_for(resolution.key)})
        _note(request, digest=resolution.digest, cache_hit=cached)
        if record is None:
            record = await _prepare_or_start_early(request, wanted, resolution, name)
            if isinstance(record, Response):
                return record
        attributes["container.image.id"] = record.config_digest
        plan = plan_archive(state.store.get_blob(record.config_digest), record.config_digest,
                            state.store.layer_files(record), name)
    except PassthroughError as exc:
        log.info("download %s failed: %s %s", request.url.path, exc.status, exc.message)
        _note(request, error=exc.code)
        response = refusal_response(exc, wanted, _may_challenge(request))
        attributes["registry.client_auth.challenge_sent"] = "www-authenticate" in response.headers
        attributes["error.type"] = exc.code
        return response
    log.debug("download %s: %s@%s, %d bytes, cache %s, ready in %.3fs", request.url.path,
              wanted.image.repository, resolution.digest, plan.size, "hit" if cached else "miss",
              time.monotonic() - started)
    response = archive_response(request, plan, record, wanted.filename)
    if resolution.stale_reason:
        response.headers["X-Served-Stale"] = "registry unreachable"
        response.headers["Warning"] = '110 - "Response is Stale"'
    return response


async def _prepare_or_start_early(request: Request, wanted: ImageRequest, resolution: Resolution,
                                  name: str) -> ImageRecord | Response:
    """The prepared image; or, for a GET still preparing after PREPARE_GRACE, a response already streaming."""
    state = request.app.state
    settings = state.settings
    spec = _spec(wanted, resolution)
    credentials, token = wanted.auth.credentials, wanted.auth.token
    if request.method != "GET" or settings.prepare_grace <= 0:
        return await state.preparer.ensure(spec, credentials, token)
    job_id = await state.preparer.start(spec, credentials, token)
    try:
        return await asyncio.wait_for(state.preparer.ensure(spec, credentials, token), settings.prepare_grace)
    except TimeoutError:
        pass
    client = RegistryClient(state.http, wanted.target, wanted.image.repository, credentials, token)
    early = await plan_before_ready(client, state.store, resolution.digest, name)
    if early is None:  # some size cannot be known in advance: wait it out
        log.info("download %s: sizes unknown before unpacking, waiting for the preparation", request.url.path)
        return await state.preparer.ensure(spec, credentials, token)
    plan, layers = early

    async def failure() -> PassthroughError | None:
        status = await state.preparer.status(job_id)
        if status is not None and status.get("state") == "failed":
            return PassthroughError.from_dict(status.get("error") or {})
        return None

    log.info("download %s: still preparing after %gs, streaming %d bytes as layers verify", request.url.path,
             settings.prepare_grace, plan.size)
    body = stream_as_prepared(plan, layers, state.store, wanted.target.api_url, wanted.image.repository, failure,
                              lambda: state.store.get_image(resolution.key) is not None, settings.prepare_timeout)
    headers = {**_archive_headers(plan, resolution.digest, wanted.filename), "Content-Length": str(plan.size)}
    return StreamingResponse(body, headers=headers)


async def prewarm(request: Request) -> Response:
    """POST on a download URL: prepare the image now, answer 202 with where to watch it."""
    wanted = None
    try:
        wanted = parse_image_request(request)
        resolution = await resolve(request, wanted)
        state = request.app.state
        if state.store.get_image(resolution.key) is not None:
            job_id = job_id_for(resolution.key)
            status, body = 200, {"state": "done"}
        else:
            job_id = await state.preparer.start(_spec(wanted, resolution), wanted.auth.credentials, wanted.auth.token)
            status, body = 202, (await state.preparer.status(job_id)) or {"state": "queued"}
    except PassthroughError as exc:
        return refusal_response(exc, wanted, _may_challenge(request))
    status_url = f"/status/{job_id}"
    return JSONResponse({**body, "job_id": job_id, "manifest_digest": resolution.digest, "status_url": status_url},
                        status_code=status, headers={"Location": status_url})


async def job_status(request: Request) -> Response:
    job_id = request.path_params["job_id"]
    status = await request.app.state.preparer.status(job_id)
    if status is None:
        return JSONResponse({"error": "unknown_job", "status": 404, "message": f"no preparation {job_id} is known"},
                            status_code=404)
    return JSONResponse({"job_id": job_id, **status})


def archive_etag(manifest_digest: str, repo_tag_name: str) -> str:
    """Strong: same manifest, same name, same layout version → same bytes."""
    return '"' + hashlib.sha256(f"{ARCHIVE_LAYOUT}\n{manifest_digest}\n{repo_tag_name}".encode()).hexdigest()[:40] + '"'


def _archive_headers(plan: ArchivePlan, digest: str, filename: str) -> dict[str, str]:
    return {
        "Content-Disposition": f'attachment; filename="{filename}"',
        "Content-Type": "application/x-tar",
        "Accept-Ranges": "bytes",
        "ETag": archive_etag(digest, plan.repo_tag),
        "X-Manifest-Digest": digest,
    }


def archive_response(request: Request, plan: ArchivePlan, record: ImageRecord, filename: str) -> Response:
    headers = _archive_headers(plan, record.manifest_digest, filename)
    etag = headers["ETag"]
    try:
        wanted = requested_range(request.headers.get("range"), request.headers.get("if-range"), etag, plan.size)
    except UnsatisfiableRange:
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{plan.size}"})
    start, end = wanted or (0, plan.size)
    status = 200
    if wanted is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{plan.size}"
    headers["Content-Length"] = str(end - start)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers)
    diff_ids = [layer.diff_id for layer in record.layers]
    return StreamingResponse(_leased_stream(request.app.state.store, plan, diff_ids, start, end), status_code=status,
                             headers=headers)


async def _leased_stream(store: Store, plan: ArchivePlan, diff_ids: list[str], start: int,
                         end: int) -> AsyncIterator[bytes]:
    """The archive bytes, with the layers leased so no eviction removes them mid-stream.

    Piece size follows the client: a fast client gets up to 4 MiB per send (fewer hops, near disk speed), a
    slow one (a switch at 1.4 MB/s) 64 KiB, so hundreds of slow transfers hold little memory each — a piece
    waits in the socket buffer until the client has read it.
    """
    record_use(store, diff_ids)
    loop = asyncio.get_running_loop()
    pacer = PiecePacer(loop.time())
    reader = ArchiveReader(plan)
    with leased(store, diff_ids) as leases, contextlib.closing(reader):
        position = start
        while position < end:
            data = await reader.read(position, min(position + pacer.piece, end))
            sent_at = loop.time()
            yield data  # returns once the server has handed it to a draining socket
            position += len(data)
            leases.refresh()
            pacer.sent(len(data), sent_at, loop.time())


PIECE_MIN = 64 << 10
PIECE_START = 128 << 10
PIECE_MAX = 4 << 20
# Aim for pieces a client drains in about this long.
PIECE_SECONDS = 0.02
# Socket buffers swallow the first megabytes at once, even for a slow client: trust the average rate only
# after this much, and stay at PIECE_START until then.
PIECE_TRUST_AFTER = 8 << 20


def _piece_for(rate: float) -> int:
    size = PIECE_MIN
    while size * 2 <= rate * PIECE_SECONDS and size < PIECE_MAX:
        size *= 2
    return size


class PiecePacer:
    """Piece size that follows the client: big for fast ones (fewer hops), small for slow ones, whose pieces
    wait in memory until they read them."""

    def __init__(self, now: float):
        self.started = now
        self.total = 0
        self.piece = PIECE_START

    def sent(self, size: int, began: float, ended: float) -> None:
        self.total += size
        this_send = _piece_for(size / max(ended - began, 1e-6))
        overall = _piece_for(self.total / max(ended - self.started, 1e-6))
        self.piece = min(this_send, overall if self.total >= PIECE_TRUST_AFTER else PIECE_START)
