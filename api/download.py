"""The download routes: filename → image → prepared archive, streamed with an exact Content-Length."""

from __future__ import annotations

import logging
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from api.client_auth import CHALLENGE, basic_credentials, choose_upstream_auth
from shared import manifest as mf
from shared.archive import iter_archive, plan_archive
from shared.errors import BadRequest, PassthroughError, Unauthorized
from shared.jobs import JobSpec
from shared.name import FilenameError, parse_filename, repo_tag
from shared.prepare import image_key
from shared.registry import RegistryClient, RegistryTarget, target_from_url
from shared.store import Store

log = logging.getLogger("docker_http_passthrough.api")


def error_response(exc: PassthroughError, *, challenge: bool = False) -> JSONResponse:
    headers = {"WWW-Authenticate": CHALLENGE} if challenge else None
    return JSONResponse(exc.to_dict(), status_code=exc.status, headers=headers)


async def resolve_platform_digest(client: RegistryClient, store: Store, tag: str, platform: str) -> str:
    """Tag → digest of the platform's image manifest: one HEAD, plus an index GET only when not stored yet."""
    head = await client.head_manifest(tag)
    if head.media_type not in mf.INDEXES:
        return head.digest
    index = store.get_blob(head.digest)
    if index is None:
        index, _ = await client.get_manifest(head.digest)
        store.put_blob(head.digest, index)
    return mf.select_platform(index, platform).digest


def _target(request: Request) -> RegistryTarget:
    params = request.path_params
    if "host" not in params:
        return request.app.state.default_target
    try:
        return target_from_url(params["scheme"], params["host"])
    except ValueError as exc:
        raise BadRequest(str(exc), code="bad_registry") from None


async def download(request: Request) -> Response:
    state = request.app.state
    settings = state.settings
    started = time.monotonic()
    filename = request.path_params["filename"]
    requires_client_auth = request.url.path.startswith("/registry-auth/") or (
        settings.registry_client_auth == "required" and request.url.path.startswith("/docker/"))
    may_challenge = requires_client_auth or settings.registry_client_auth != "off"
    try:
        target = _target(request)
        try:
            image = parse_filename(filename, docker_hub=target.is_docker_hub,
                                   default_namespace=settings.registry_default_namespace)
        except FilenameError as exc:
            raise BadRequest(str(exc), code=f"bad_filename:{exc.rule}") from None
        client_creds = basic_credentials(request.headers.get("authorization"))
        if settings.registry_client_auth == "off" and not request.url.path.startswith("/registry-auth/"):
            client_creds = None
        if requires_client_auth and client_creds is None:
            raise Unauthorized("this route needs your registry credentials (HTTP Basic)", code="credentials_required")
        auth = choose_upstream_auth(settings, target, state.default_target, client_creds)
        client = RegistryClient(state.http, target, image.repository, auth.credentials, auth.token)
        digest = await resolve_platform_digest(client, state.store, image.tag, settings.platform)
        record = state.store.get_image(image_key(target.api_url, image.repository, digest))
        cached = record is not None
        if record is None:
            spec = JobSpec(target.to_dict(), image.repository, digest, auth.source)
            record = await state.preparer.ensure(spec, auth.credentials, auth.token)
        config = state.store.get_blob(record.config_digest)
        plan = plan_archive(config, record.config_digest, state.store.layer_files(record),
                            repo_tag(image, registry_host=target.repo_tag_host))
    except Unauthorized as exc:
        log.info("download %s refused: %s", request.url.path, exc.message)
        return error_response(exc, challenge=may_challenge and exc.code != "registry_forbidden")
    except PassthroughError as exc:
        log.info("download %s failed: %s %s", request.url.path, exc.status, exc.message)
        return error_response(exc)
    log.info("download %s: %s@%s, %d bytes, cache %s, ready in %.3fs", request.url.path, image.repository, digest,
             plan.size, "hit" if cached else "miss", time.monotonic() - started)
    headers = {
        "Content-Length": str(plan.size),
        "Content-Disposition": f'attachment; filename="{filename}"',
        "X-Manifest-Digest": digest,
    }
    return StreamingResponse(iter_archive(plan), media_type="application/x-tar", headers=headers)
