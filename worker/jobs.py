"""The RQ job: prepare one image into the shared store, then tell waiting API processes how it went."""

from __future__ import annotations

import asyncio
import json
import logging
import threading

from opentelemetry import context as otel_context

from docker_http_passthrough.shared.errors import PassthroughError, failure_of
from docker_http_passthrough.shared.job_queue import current_job, current_run, still_current
from docker_http_passthrough.shared.jobs import (
    CREDENTIAL_SOURCES,
    JobSpec,
    Progress,
    credentials_key,
    heartbeat_key,
    outcome_key,
    progress_key,
    unseal_credentials,
)
from docker_http_passthrough.shared.locks import RedisLocks
from docker_http_passthrough.shared.prepare import prepare_image
from docker_http_passthrough.shared.redis_clients import async_client
from docker_http_passthrough.shared.registry import RegistryClient
from docker_http_passthrough.shared.registry_auth import AuthCache
from docker_http_passthrough.shared.settings import Settings, load_settings
from docker_http_passthrough.shared.store import Store
from docker_http_passthrough.shared.targets import Credentials, settings_auth
from docker_http_passthrough.shared.telemetry import extract_context, flush_tracing, setup_tracing
from docker_http_passthrough.shared.upstream_http import registries_for

log = logging.getLogger("docker_http_passthrough.worker")

HEARTBEAT_EVERY = 1.0
OUTCOME_TTL = 3600
# Blob locks expire this long after their holder stopped renewing them (at most WORKER_LOST_TIMEOUT, so the rerun
# of a dead worker's job finds them free).
LOCK_TTL = 10.0
# This worker process's memory of registry challenges and tokens: jobs run one after another in this process
# (each on its own event loop and connection pool), and a token fetched by one job serves the next.
WORKER_AUTH = AuthCache()


def _credentials(settings: Settings, spec: JobSpec, sealed: bytes | None) -> tuple[Credentials | None, str | None]:
    """(Basic credentials, static bearer token) for the source the API chose."""
    if spec.credential_source == "client":
        if sealed is None or not settings.credentials_key:
            raise PassthroughError("the client's credentials for this job are gone or CREDENTIALS_KEY is not set "
                                   "on the worker", status=503, code="credentials_unavailable")
        return unseal_credentials(sealed, settings.credentials_key), None
    if spec.credential_source == "settings":
        return settings_auth(settings)
    return None, None


async def _prepare(settings: Settings, spec: JobSpec, credentials: Credentials | None, token: str | None,
                   progress: Progress) -> None:
    store = Store(settings.cache_dir)
    redis = async_client(settings)
    locks = RedisLocks(redis, ttl=min(LOCK_TTL, settings.worker_lost_timeout))
    try:
        async with registries_for(settings, WORKER_AUTH, blob_locks=locks) as registries:
            client = RegistryClient(registries, spec.registry, spec.repository, credentials, token)
            await prepare_image(client, store, spec.manifest_digest, locks, settings.layer_concurrency,
                                progress, settings.cache_max_bytes)
    finally:
        await redis.aclose()


def _beat(connection, job_id: str, progress: Progress, stop: threading.Event, ttl_ms: int) -> None:
    """Tell waiting API processes the job is alive, and how far it is."""
    while not stop.is_set():
        try:
            pipe = connection.pipeline()
            # The key lives WORKER_LOST_TIMEOUT: it exists exactly while this job beat within that time.
            pipe.set(heartbeat_key(job_id), "1", px=ttl_ms)
            pipe.hset(progress_key(job_id), mapping=progress.as_dict())
            pipe.pexpire(progress_key(job_id), ttl_ms + 60_000)
            pipe.execute()
        except Exception:  # a Redis hiccup must not kill the job; the API tolerates a missed beat
            log.warning("heartbeat to Redis failed", exc_info=True)
        stop.wait(min(HEARTBEAT_EVERY, ttl_ms / 3000))


def _report(connection, job, run: str | None, outcome: dict) -> None:
    """The job's last act, in one transaction: drop what only a running job has, publish how it went. Not when
    this worker was given up for dead meanwhile (stalled past WORKER_LOST_TIMEOUT) and its job runs again: the
    rerun reports."""
    job_id = job.id
    if not still_current(job, run):
        log.warning("job %s runs again elsewhere (this worker was silent too long): not reporting", job_id)
        return
    pipe = connection.pipeline()
    pipe.delete(credentials_key(job_id), heartbeat_key(job_id), progress_key(job_id))
    pipe.set(outcome_key(job_id), json.dumps(outcome), ex=OUTCOME_TTL)
    pipe.publish(outcome_key(job_id), json.dumps(outcome))
    pipe.execute()


def prepare(target: dict, repository: str, manifest_digest: str, credential_source: str) -> dict:
    if credential_source not in CREDENTIAL_SOURCES:
        raise ValueError(f"unknown credential source {credential_source!r}")
    settings = load_settings()
    job = current_job()
    connection = job.connection
    spec = JobSpec(target, repository, manifest_digest, credential_source)
    run = current_run(job)
    stop = threading.Event()
    progress = Progress()
    beat = threading.Thread(target=_beat, daemon=True,
                            args=(connection, job.id, progress, stop, int(settings.worker_lost_timeout * 1000)))
    beat.start()
    outcome: dict | None = None  # stays None only when the job is stopped from outside (cold shutdown)
    setup_tracing("worker")
    # The API's trace context rides in the job's meta: our spans continue the request's trace.
    token_ctx = otel_context.attach(extract_context(job.meta.get("trace")))
    try:
        credentials, token = _credentials(settings, spec, connection.get(credentials_key(job.id)))
        asyncio.run(_prepare(settings, spec, credentials, token, progress))
        outcome = {"ok": True}
        return outcome
    except Exception as exc:
        outcome = {"ok": False, **failure_of(exc).to_dict()}
        raise
    finally:
        if outcome is None:  # SystemExit from a second SIGTERM (RQ's cold shutdown): tell the waiters now
            outcome = {"ok": False, "error": "worker_stopped", "status": 503,
                       "message": "the worker preparing this image was stopped before it finished; ask again"}
        otel_context.detach(token_ctx)
        flush_tracing()  # send this job's spans now: a worker stopped between jobs must not lose them
        stop.set()
        beat.join(timeout=2)
        _report(connection, job, run, outcome)
        log.info("prepared %s/%s@%s: %s", spec.registry.name, repository, manifest_digest,
                 "ok" if outcome["ok"] else outcome["message"])
