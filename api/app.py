"""The starlette application: routes, and the parts each request uses, which the app owns for its lifetime:
the store and the leases of its downloads, `Registries` (connection pool and auth cache), the preparer, the
error cache, the registry lookups in flight, the plans of prepared images and the size guesses. Each API process (`serve --workers N`) has its own app, so its own of each."""

from __future__ import annotations

import contextlib
import logging
from typing import AsyncIterator

import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from docker_http_passthrough.api.download_routes import Plans, download, job_status, prewarm
from docker_http_passthrough.api.embedded_preparer import EmbeddedPreparer
from docker_http_passthrough.api.http_errors import EXCEPTION_HANDLERS
from docker_http_passthrough.api.keyless import STARTUP_NOTE, KeylessPreparer
from docker_http_passthrough.api.lease_book import LeaseBook
from docker_http_passthrough.api.limits import ClientDownloads, ColdImages, PerClientDownloads
from docker_http_passthrough.api.observability import TelemetryMiddleware, metrics
from docker_http_passthrough.api.page import index, info
from docker_http_passthrough.api.queue_preparer import QueuePreparer
from docker_http_passthrough.api.resolution import ErrorCache, SharedLookups
from docker_http_passthrough.api.size_probes import SizeGuesses
from docker_http_passthrough.shared.locks import FileLocks, RedisLocks
from docker_http_passthrough.shared.redis_clients import async_client
from docker_http_passthrough.shared.settings import Settings
from docker_http_passthrough.shared.store import Store
from docker_http_passthrough.shared.targets import target_from_settings
from docker_http_passthrough.shared.telemetry import flush_tracing, setup_tracing
from docker_http_passthrough.shared.upstream_http import registries_for

log = logging.getLogger("docker_http_passthrough.api")


async def health(request: Request) -> JSONResponse:
    settings: Settings = request.app.state.settings
    body = {"status": "ok", "mode": "two-tier" if settings.two_tier else "embedded",
            "registry": request.app.state.default_target.name}
    if settings.two_tier:
        try:
            async with aioredis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2) as r:
                await r.ping()
            body["redis"] = "ok"
        except Exception as exc:  # any failure means "not answering" to an operator
            body.update(status="degraded", redis=f"unreachable ({type(exc).__name__})")
            return JSONResponse(body, status_code=503)
    return JSONResponse(body)


async def download_or_prewarm(request: Request) -> Response:
    """One route per path, so a 405 names every method the path takes."""
    return await (prewarm(request) if request.method == "POST" else download(request))


ROUTE_PATHS = (
    "/docker/{filename}",
    "/registry/{scheme}/{host}/docker/{filename}",
    "/registry-auth/{scheme}/{host}/docker/{filename}",
    "/ref/{reference:path}",
    "/ref-auth/{reference:path}",
)
# Each route also answers behind a platform. Without a variant first: a /ref/ reference may start with a
# component that would otherwise read as a variant (/platform/linux/arm64/ref/docker/x.tar).
PLATFORM_PREFIXES = ("", "/platform/{os}/{arch}", "/platform/{os}/{arch}/{variant}")
DOWNLOAD_PATHS = tuple(prefix + path for prefix in PLATFORM_PREFIXES for path in ROUTE_PATHS)


def create_app(settings: Settings) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        setup_tracing("api")
        store = Store(settings.cache_dir)  # `serve` swept its partial files before the processes started
        # Each small blob is fetched once: two-tier, between API replicas and workers (a Redis lock per blob);
        # embedded, between the API processes of this server (a file lock per blob in the store).
        lock_redis = async_client(settings) if settings.two_tier else None
        blob_locks = RedisLocks(lock_redis) if lock_redis is not None else FileLocks(store.root / "locks")
        async with registries_for(settings, blob_locks=blob_locks) as registries:
            app.state.settings = settings
            app.state.store = store
            app.state.leases = LeaseBook(store)
            app.state.plans = Plans()
            app.state.registries = registries
            app.state.default_target = target_from_settings(settings)
            app.state.error_cache = ErrorCache(settings.error_cache_seconds)
            app.state.lookups = SharedLookups()
            app.state.size_guesses = SizeGuesses()
            app.state.cold_images = ColdImages(settings.max_cold_images)
            if settings.two_tier:
                app.state.preparer = QueuePreparer(settings, store)
                if not settings.credentials_key:
                    log.warning(STARTUP_NOTE)
                    app.state.preparer = KeylessPreparer(app.state.preparer, EmbeddedPreparer(
                        settings, store, registries, locks=blob_locks))
            else:
                app.state.preparer = EmbeddedPreparer(settings, store, registries)
            try:
                yield
            finally:
                app.state.leases.close()
                await app.state.preparer.close()
                if lock_redis is not None:
                    await lock_redis.aclose()
                flush_tracing()

    routes = [
        Route("/", index, methods=["GET", "HEAD"]),
        Route("/info", info, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/status/{job_id}", job_status, methods=["GET"]),
    ]
    per_client = [Middleware(PerClientDownloads, downloads=ClientDownloads(settings.max_downloads_per_client))]
    for path in DOWNLOAD_PATHS:
        routes.append(Route(path, download_or_prewarm, methods=["GET", "HEAD", "POST"], middleware=per_client))
    routes.append(Route("/metrics", metrics, methods=["GET"]))
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(TelemetryMiddleware)],
                    exception_handlers=EXCEPTION_HANDLERS)
    app.router.redirect_slashes = False  # a device follows no redirect: a trailing slash is a JSON 404
    return app
