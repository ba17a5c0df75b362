"""The download routes: filename → image → prepared archive, streamed with an exact Content-Length.

GET and HEAD answer the archive (Range and If-Range for resuming); POST starts the preparation and answers
202 with a status URL, for warming the cache before a rollout; GET /status/{job} tells how a preparation is.
The bytes go out through `archive_stream`, warm or early-start alike.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from docker_http_passthrough.api.archive_headers import archive_headers
from docker_http_passthrough.api.archive_stream import ArchiveResponse, stream_archive
from docker_http_passthrough.api.client_auth import CHALLENGE
from docker_http_passthrough.api.client_presence import ClientLeft, unless_client_leaves
from docker_http_passthrough.api.early_gate import EarlyGate
from docker_http_passthrough.api.early_stream import plan_before_ready
from docker_http_passthrough.api.preparation import PreparationWatch
from docker_http_passthrough.api.ranges import UnsatisfiableRange, requested_range
from docker_http_passthrough.api.resolution import (
    ImageRequest,
    Resolution,
    auth_route,
    image_attributes,
    parse_image_request,
    resolve,
)
from docker_http_passthrough.shared.archive import ArchivePlan, plan_archive
from docker_http_passthrough.shared.errors import Forbidden, PassthroughError, Unauthorized
from docker_http_passthrough.shared.jobs import JobSpec, job_id_for
from docker_http_passthrough.shared.name import repo_tag
from docker_http_passthrough.shared.registry import RegistryClient
from docker_http_passthrough.shared.store import ImageRecord, Store

log = logging.getLogger("docker_http_passthrough.api")


class Plans:
    """The plans of prepared images, by image and name, for repeat downloads (a fleet asks for one image many
    times): a plan is a function of the prepared image, which never changes. Bounded; one per API process."""

    def __init__(self, kept: int = 64):
        self.kept = kept
        self.plans: OrderedDict[tuple[str, str], ArchivePlan] = OrderedDict()

    def get(self, store: Store, key: str, record: ImageRecord, name: str) -> ArchivePlan:
        plan = self.plans.get((key, name))
        if plan is None:
            plan = plan_archive(store.get_blob(record.config_digest), record.config_digest, store.layer_files(record),
                                name)
            self.plans[key, name] = plan
            if len(self.plans) > self.kept:
                self.plans.popitem(last=False)
        else:
            self.plans.move_to_end((key, name))
        return plan


def error_response(exc: PassthroughError, *, challenge: bool = False) -> JSONResponse:
    headers = {"WWW-Authenticate": CHALLENGE} if challenge else {}
    return JSONResponse(exc.to_dict(), status_code=exc.status, headers={**headers, **exc.headers()})


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
    return auth_route(request) or settings.registry_client_auth != "off"


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
        _note(request, image=f"{wanted.target.name}/{wanted.image}", platform=str(wanted.platform))
        resolution = await unless_client_leaves(request, resolve(request, wanted))
        name = repo_tag(wanted.image, registry_host=wanted.target.repo_tag_host)
        record = state.store.get_image(resolution.key)
        cached = record is not None
        attributes.update({"oci.manifest.digest": resolution.digest, "dhp.cache.hit": cached,
                           "dhp.job.id": job_id_for(resolution.key)})
        _note(request, digest=resolution.digest, cache_hit=cached)
        if record is None:
            await state.cold_images.admit(resolution.key, state.store, state.preparer)
        if record is None and _may_start_early(request):
            early = await unless_client_leaves(request, _early_response(request, wanted, resolution, name))
            if early is not None:
                return early
        if record is None:
            record = await unless_client_leaves(request, state.preparer.ensure(
                _spec(wanted, resolution), wanted.auth.credentials, wanted.auth.token))
        attributes["container.image.id"] = record.config_digest
        plan = state.plans.get(state.store, resolution.key, record, name)
    except ClientLeft:
        log.info("download %s: the client hung up while its image was prepared", request.url.path)
        _note(request, error="client_left")
        return Response(status_code=499)  # never sent: nobody is there to read it
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


def _may_start_early(request: Request) -> bool:
    """A cold GET streams while its image is prepared, unless PREPARE_GRACE=0; a Range request (resuming) waits
    for the image, whose bytes it can then have from anywhere."""
    return request.method == "GET" and request.app.state.settings.prepare_grace > 0 and "range" not in request.headers


async def _early_response(request: Request, wanted: ImageRequest, resolution: Resolution,
                          name: str) -> Response | None:
    """A response that starts after PREPARE_GRACE, as soon as the archive's exact length is known, and sends the
    layers as the preparation inflates them; None when the preparation finished first (or cannot be planned
    before: it then says why). A preparation that fails before the headers raises its error (a JSON answer)."""
    state = request.app.state
    settings = state.settings
    client = RegistryClient(state.registries, wanted.target, wanted.image.repository, wanted.auth.credentials,
                            wanted.auth.token)
    watch = PreparationWatch(state.preparer, _spec(wanted, resolution), wanted.auth.credentials, wanted.auth.token,
                             settings.worker_lost_timeout)
    try:
        early = await plan_before_ready(client, state.store, state.size_guesses, resolution.digest, name, watch,
                                        settings.prepare_grace)
    except BaseException:
        watch.close()
        raise
    if early is None:
        watch.close()
        return None
    log.info("download %s: streaming %d bytes as the layers are prepared", request.url.path, early.plan.size)
    gate = EarlyGate(early, state.store, wanted.target.api_url, wanted.image.repository, resolution.key, watch,
                     settings.prepare_timeout)
    headers = {**archive_headers(early.plan, resolution.digest, wanted.filename),
               "Content-Length": str(early.plan.size)}
    return ArchiveResponse(lambda zero_copy: stream_archive(state.leases, early.plan, early.diff_ids, 0, early.plan.size,
                                                            gate, zero_copy and settings.zero_copy), headers=headers)


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
            await state.cold_images.admit(resolution.key, state.store, state.preparer)
            job_id = await state.preparer.start(_spec(wanted, resolution), wanted.auth.credentials, wanted.auth.token)
            state.preparer.hold(job_id)  # a pre-warm is needed until it is done: never released
            status, body = 202, (await state.preparer.status(job_id)) or {"state": "queued"}
    except PassthroughError as exc:
        return refusal_response(exc, wanted, _may_challenge(request))
    status_url = f"/status/{job_id}"
    return JSONResponse({**body, "job_id": job_id, "manifest_digest": resolution.digest,
                         "platform": str(wanted.platform), "status_url": status_url},
                        status_code=status, headers={"Location": status_url})


async def job_status(request: Request) -> Response:
    job_id = request.path_params["job_id"]
    status = await request.app.state.preparer.status(job_id)
    if status is None:
        return JSONResponse({"error": "unknown_job", "status": 404, "message": f"no preparation {job_id} is known"},
                            status_code=404)
    return JSONResponse({"job_id": job_id, **status})


def archive_response(request: Request, plan: ArchivePlan, record: ImageRecord, filename: str) -> Response:
    """A prepared image: the whole archive, one range of it (206), or only the headers (HEAD)."""
    headers = archive_headers(plan, record.manifest_digest, filename)
    etag = headers["ETag"]
    try:
        wanted = requested_range(request.headers.get("range"), request.headers.get("if-range"), etag, plan.size)
    except UnsatisfiableRange:
        refusal = PassthroughError(f"the requested range is outside the archive ({plan.size} bytes)", status=416,
                                   code="range_not_satisfiable")
        return JSONResponse(refusal.to_dict(), status_code=416, headers={
            "Content-Range": f"bytes */{plan.size}", "Accept-Ranges": "bytes", "ETag": etag})
    start, end = wanted or (0, plan.size)
    status = 200
    if wanted is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{plan.size}"
    headers["Content-Length"] = str(end - start)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers)
    diff_ids = [layer.diff_id for layer in record.layers]
    leases, allowed = request.app.state.leases, request.app.state.settings.zero_copy
    return ArchiveResponse(lambda zero_copy: stream_archive(leases, plan, diff_ids, start, end,
                                                            zero_copy=zero_copy and allowed),
                           status_code=status, headers=headers)
