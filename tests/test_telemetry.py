"""Traces and logs of a download, in process: the API under httpx's ASGI transport (lifespan driven by hand), spans
caught by an in-memory exporter, against the real test registries. Two-tier runs the RQ job in a SimpleWorker on a
thread of this process, so the worker's spans land in the same exporter as the API's."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import AsyncIterator, Iterable

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import REGISTRY
from redis import Redis
from rq import Queue, SimpleWorker
from rq.timeouts import TimerDeathPenalty
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

import docker_http_passthrough.shared.registry as registry_module
from docker_http_passthrough.api.app import create_app
from docker_http_passthrough.api.observability import TelemetryMiddleware
from docker_http_passthrough.cli import log_level
from docker_http_passthrough.shared.settings import load_settings
from docker_http_passthrough.shared.telemetry import (
    JsonFormatter,
    extract_context,
    flush_tracing,
    inject_context,
    link_to,
    setup_tracing,
    tracer,
)
from tests.support.images import make_layer

REPO_ROOT = Path(__file__).resolve().parents[1]
ROUTE_DOCKER = "GET /docker/{filename}"
ROUTE_REGISTRY = "GET /registry/{scheme}/{host}/docker/{filename}"
ROUTE_REGISTRY_AUTH = "GET /registry-auth/{scheme}/{host}/docker/{filename}"
HEAD_MANIFEST = "HEAD /v2/{repository}/manifests/{reference}"
GET_MANIFEST = "GET /v2/{repository}/manifests/{reference}"
GET_BLOB = "GET /v2/{repository}/blobs/{digest}"
TOKEN = "GET {registry_token_endpoint}"
ALICE = ("alice", "wonderland")
CLIENT_ADDRESS = ("192.0.2.7", 50123)

# --------------------------------------------------------------------------- span capture

_EXPORTER: InMemorySpanExporter | None = None


@pytest.fixture(scope="module")
def exporter() -> Iterable[InMemorySpanExporter]:
    """The global tracer provider can be set once per process: install an SDK one (unless there is one already) and
    export to memory for this module; afterwards the exporter is shut down, so later tests keep nothing."""
    global _EXPORTER
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    assert trace.get_tracer_provider() is provider, "another tracer provider was installed first"
    _EXPORTER = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    yield _EXPORTER
    _EXPORTER.clear()
    _EXPORTER.shutdown()


@pytest.fixture(autouse=True)
def _clear_spans(exporter: InMemorySpanExporter) -> None:
    exporter.clear()


def spans_named(spans: Iterable[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def one(spans: Iterable[ReadableSpan], name: str) -> ReadableSpan:
    found = spans_named(spans, name)
    assert len(found) == 1, f"expected one {name!r} span, got {len(found)}: {[s.name for s in spans]}"
    return found[0]


def in_trace(spans: Iterable[ReadableSpan], root: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in spans if s.context.trace_id == root.context.trace_id]


def chain(span: ReadableSpan, spans: Iterable[ReadableSpan]) -> list[str]:
    """Names from `span` up to its root, following parent ids within `spans`."""
    by_id = {s.context.span_id: s for s in spans}
    names = [span.name]
    while span.parent is not None:
        span = by_id.get(span.parent.span_id)
        assert span is not None, f"{names[-1]!r} has a parent that was never exported: {names}"
        names.append(span.name)
    return names


def route_spans(spans: Iterable[ReadableSpan], name: str) -> list[ReadableSpan]:
    return sorted((s for s in spans if s.name == name and s.kind == SpanKind.SERVER), key=lambda s: s.start_time)


def trace_hex(span: ReadableSpan) -> str:
    return format(span.context.trace_id, "032x")


def all_strings(span: ReadableSpan) -> list[str]:
    """Every string a span carries to a backend: name, attributes, events, links, status, resource."""
    out = [span.name, span.status.description or ""]
    sources = [span.attributes, span.resource.attributes]
    sources += [event.attributes for event in span.events] + [link.attributes for link in span.links]
    out += [event.name for event in span.events]
    for attributes in sources:
        for key, value in (attributes or {}).items():
            out.append(key)
            out += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return out


def assert_no_secrets(spans: Iterable[ReadableSpan], *secrets: str) -> None:
    for span in spans:
        for text in all_strings(span):
            for needle in ("Basic ", "Bearer ", "eyJ", *secrets):
                assert needle not in text, f"span {span.name!r} carries {needle!r}: {text!r}"


# --------------------------------------------------------------------------- the API in process


def filename_for(repository: str, tag: str) -> str:
    return repository.replace("/", "__") + f"_{tag}.tar"


@contextlib.asynccontextmanager
async def serve(env: dict[str, str]) -> AsyncIterator[tuple[object, httpx.AsyncClient]]:
    app = create_app(load_settings(env))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=CLIENT_ADDRESS)
        async with httpx.AsyncClient(transport=transport, base_url="http://dhp.test:8080",
                                     headers={"User-Agent": "Cisco-IOS-XE/17.9"}, timeout=60) as client:
            yield app, client


class _ThreadWorker(SimpleWorker):
    """Runs jobs on a thread of this process: no signal handlers, timeouts by timer, not SIGALRM."""

    death_penalty_class = TimerDeathPenalty

    def _install_signal_handlers(self) -> None:
        pass


@contextlib.contextmanager
def thread_worker(redis_url: str, queue_name: str = "docker-http-passthrough"):
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        connection = Redis.from_url(redis_url)
        try:
            while not stop.is_set():
                _ThreadWorker([Queue(queue_name, connection=connection)], connection=connection).work(
                    burst=True, logging_level="WARNING")
                stop.wait(0.05)
        except BaseException as exc:  # surfaced by the test, not lost in the thread
            errors.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=loop, name="rq-simple-worker", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not errors, errors


@pytest.fixture
def two_tier_env(redis_server, tmp_path, monkeypatch) -> dict[str, str]:
    """The job reads its settings from os.environ (as a worker process does): share cache and Redis with the API."""
    env = {"CACHE_DIR": str(tmp_path / "cache"), "REDIS_URL": redis_server.url}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def embedded_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"CACHE_DIR": str(tmp_path / "cache"), **extra}


async def wait_until(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)


def download_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "docker_http_passthrough.access"
            and (getattr(r, "fields", None) or {}).get("event") == "download"]


SERVER_ATTRIBUTES = {
    "http.request.method", "http.route", "url.path", "url.scheme", "server.address", "client.address",
    "network.peer.address", "network.peer.port", "network.protocol.name", "network.transport",
    "user_agent.original", "http.response.status_code", "http.response.body.size",
    "container.image.name", "container.image.tag", "container.image.id", "oci.manifest.digest",
    "registry.name", "registry.url", "registry.target.source", "registry.auth.configured",
    "registry.client_auth.mode", "registry.client_auth.credentials_present", "registry.client_auth.credentials_used",
    "registry.client_auth.challenge_sent", "registry.default_namespace", "dhp.cache.hit", "dhp.job.id",
}
CLIENT_ATTRIBUTES = {
    "http.request.method", "url.full", "url.scheme", "url.template", "server.address", "server.port",
    "http.response.status_code", "http.request.resend_count", "registry.name", "registry.url",
    "registry.operation", "registry.auth.type", "oci.image.ref",
}


def missing(span: ReadableSpan, wanted: set[str]) -> set[str]:
    return wanted - set(span.attributes or {})


# --------------------------------------------------------------------------- embedded


def test_embedded_cold_and_warm_download_traces(registry, unique_repo, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="docker_http_passthrough.access")
    image = registry.push_image(unique_repo, "v1", [make_layer({"a.bin": os.urandom(50_000)}),
                                                    make_layer({"b.txt": b"b"})])
    path = f"/registry/http/{registry.host}/docker/{filename_for(unique_repo, 'v1')}"

    async def scenario():
        async with serve(embedded_env(tmp_path)) as (_app, client):
            cold = await client.get(path)
            warm = await client.get(path)
            return cold, warm

    cold, warm = asyncio.run(scenario())
    assert cold.status_code == 200 and warm.status_code == 200 and cold.content == warm.content
    spans = _EXPORTER.get_finished_spans()
    cold_root, warm_root = route_spans(spans, ROUTE_REGISTRY)
    assert cold_root.parent is None and warm_root.parent is None
    assert cold_root.context.trace_id != warm_root.context.trace_id
    cold_spans, warm_spans = in_trace(spans, cold_root), in_trace(spans, warm_root)
    assert [s for s in cold_spans if s.parent is None] == [cold_root], "the route span is the only root"

    names = {s.name for s in cold_spans}
    assert {"parse_image_request", "extract_registry_client_credentials", "resolve_manifest", HEAD_MANIFEST,
            GET_MANIFEST, "prepare_image", "fetch_config_blob", GET_BLOB, "download_layer_0", "download_layer_1",
            "write_layer_tar_0", "write_layer_tar_1", "wait_for_preparation"} <= names, names
    for span in cold_spans:
        assert chain(span, cold_spans)[-1] == ROUTE_REGISTRY
    # Where each span sits.
    assert chain(one(cold_spans, "extract_registry_client_credentials"), cold_spans) == [
        "extract_registry_client_credentials", "parse_image_request", ROUTE_REGISTRY]
    assert chain(one(cold_spans, HEAD_MANIFEST), cold_spans) == [HEAD_MANIFEST, "resolve_manifest", ROUTE_REGISTRY]
    assert chain(one(cold_spans, "write_layer_tar_0"), cold_spans) == [
        "write_layer_tar_0", "download_layer_0", "prepare_image", ROUTE_REGISTRY]
    blob_chains = sorted(tuple(chain(s, cold_spans)[1:]) for s in spans_named(cold_spans, GET_BLOB))
    assert blob_chains == sorted([("fetch_config_blob", "prepare_image", ROUTE_REGISTRY),
                                  ("write_layer_tar_0", "download_layer_0", "prepare_image", ROUTE_REGISTRY),
                                  ("write_layer_tar_1", "download_layer_1", "prepare_image", ROUTE_REGISTRY)])

    # The route span.
    attrs = cold_root.attributes
    assert not missing(cold_root, SERVER_ATTRIBUTES), missing(cold_root, SERVER_ATTRIBUTES)
    assert cold_root.kind == SpanKind.SERVER
    assert attrs["http.request.method"] == "GET"
    assert attrs["http.route"] == "/registry/{scheme}/{host}/docker/{filename}"
    assert attrs["url.path"] == path and attrs["url.scheme"] == "http"
    assert attrs["server.address"] == "dhp.test" and attrs["server.port"] == 8080
    assert attrs["client.address"] == CLIENT_ADDRESS[0] and attrs["network.peer.port"] == CLIENT_ADDRESS[1]
    assert attrs["user_agent.original"] == "Cisco-IOS-XE/17.9"
    assert attrs["http.response.status_code"] == 200 and attrs["http.response.body.size"] == len(cold.content)
    assert attrs["container.image.name"] == f"{registry.host}/{unique_repo}"
    assert attrs["container.image.tag"] == "v1"
    assert attrs["container.image.id"] == image.config_digest
    assert attrs["oci.manifest.digest"] == image.manifest_digest
    assert attrs["registry.name"] == registry.host and attrs["registry.url"] == f"http://{registry.host}"
    assert attrs["registry.target.source"] == "url"
    assert attrs["registry.auth.configured"] is False
    assert attrs["registry.client_auth.mode"] == "optional"
    assert attrs["registry.client_auth.credentials_present"] is False
    assert attrs["registry.client_auth.credentials_used"] is False
    assert attrs["registry.client_auth.challenge_sent"] is False
    assert attrs["dhp.cache.hit"] is False and warm_root.attributes["dhp.cache.hit"] is True
    assert attrs["dhp.job.id"].startswith("prepare-")
    assert "error.type" not in attrs

    # Client spans, one per request to the registry.
    for span in [s for s in cold_spans if s.kind == SpanKind.CLIENT]:
        assert not missing(span, CLIENT_ATTRIBUTES), (span.name, missing(span, CLIENT_ATTRIBUTES))
        assert span.attributes["http.request.resend_count"] == 0
        assert span.attributes["http.response.status_code"] == 200
        assert span.attributes["url.full"].startswith(f"http://{registry.host}/v2/{unique_repo}/")
        assert span.attributes["server.port"] == registry.proxy.port
        assert span.attributes["registry.auth.type"] == "anonymous"
        assert span.attributes["oci.image.ref"] == f"{registry.host}/{unique_repo}"
    blob_urls = sorted(s.attributes["url.full"] for s in spans_named(cold_spans, GET_BLOB))
    assert blob_urls == sorted(f"http://{registry.host}/v2/{unique_repo}/blobs/{d}"
                               for d in [image.config_digest] + [layer.digest for layer in image.layers])
    assert {s.attributes["registry.operation"] for s in spans_named(cold_spans, GET_BLOB)} == {"blob_get"}
    assert one(cold_spans, HEAD_MANIFEST).attributes["registry.operation"] == "manifest_head"
    assert one(cold_spans, HEAD_MANIFEST).attributes["url.template"] == "/v2/{repository}/manifests/{reference}"

    # Internal spans.
    parsed = one(cold_spans, "parse_image_request").attributes
    assert parsed["container.image.name"] == f"{registry.host}/{unique_repo}"
    assert parsed["registry.default_namespace"] == ""
    assert one(cold_spans, "resolve_manifest").attributes["oci.manifest.digest"] == image.manifest_digest
    prepared = one(cold_spans, "prepare_image").attributes
    assert prepared["oci.manifest.digest"] == image.manifest_digest and prepared["dhp.job.id"] == attrs["dhp.job.id"]
    assert one(cold_spans, "fetch_config_blob").attributes["oci.image.config.digest"] == image.config_digest
    for index, layer in enumerate(image.layers):
        for name in (f"download_layer_{index}", f"write_layer_tar_{index}"):
            layer_attrs = one(cold_spans, name).attributes
            assert layer_attrs["oci.layer.index"] == index and layer_attrs["oci.layer.digest"] == layer.digest
            assert layer_attrs["oci.layer.decompressed_size"] == len(layer.tar)
        assert one(cold_spans, f"download_layer_{index}").attributes["oci.layer.compressed_size"] == layer.size
    waited = one(cold_spans, "wait_for_preparation")
    assert waited.attributes["dhp.job.id"] == attrs["dhp.job.id"] and not waited.links

    # Warm: one HEAD, no preparation.
    assert {s.name for s in warm_spans} == {ROUTE_REGISTRY, "parse_image_request",
                                            "extract_registry_client_credentials", "resolve_manifest", HEAD_MANIFEST}

    # One access line per download, with the route span's trace id.
    cold_log, warm_log = download_records(caplog)
    for record, root, hit in ((cold_log, cold_root, False), (warm_log, warm_root, True)):
        fields = record.fields
        assert fields["image"] == f"{registry.host}/{unique_repo}:v1"
        assert fields["digest"] == image.manifest_digest
        assert fields["status"] == 200 and fields["bytes"] == len(cold.content)
        assert fields["cache_hit"] is hit and fields["complete"] is True
        assert isinstance(fields["duration_s"], float) and fields["duration_s"] >= 0
        assert fields["trace_id"] == trace_hex(root)
        message = record.getMessage()
        for text in (fields["image"], image.manifest_digest, " 200 ", f"bytes={len(cold.content)}",
                     f"cache_hit={hit}", f"trace_id={trace_hex(root)}"):
            assert text in message, (text, message)
        parsed_json = json.loads(JsonFormatter().format(record))
        for key in ("image", "digest", "status", "bytes", "duration_s", "cache_hit", "trace_id"):
            assert parsed_json[key] == fields[key]
        assert parsed_json["level"] == "info" and parsed_json["logger"] == "docker_http_passthrough.access"


def test_default_registry_route_and_error_span(registry, unique_repo, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="docker_http_passthrough.access")
    registry.push_image(unique_repo, "v1", [make_layer({"x": b"x"})])
    env = embedded_env(tmp_path, REGISTRY_URL=registry.url, REGISTRY_DEFAULT_NAMESPACE="test")
    name = unique_repo.removeprefix("test/")

    async def scenario():
        async with serve(env) as (_app, client):
            ok = await client.get(f"/docker/{name}_v1.tar")
            absent = await client.get(f"/docker/{name}_nosuchtag.tar")
            bad = await client.get("/docker/no-tag-here.tar")
            unmatched = await client.get("/nothing/here")
            return ok, absent, bad, unmatched

    ok, absent, bad, unmatched = asyncio.run(scenario())
    assert (ok.status_code, absent.status_code, bad.status_code, unmatched.status_code) == (200, 404, 400, 404)
    spans = _EXPORTER.get_finished_spans()
    ok_root, absent_root, bad_root = route_spans(spans, ROUTE_DOCKER)
    assert ok_root.attributes["registry.target.source"] == "settings"
    assert ok_root.attributes["registry.default_namespace"] == "test"
    assert ok_root.attributes["container.image.name"] == f"{registry.host}/{unique_repo}"
    assert ok_root.attributes["http.route"] == "/docker/{filename}"

    assert absent_root.attributes["http.response.status_code"] == 404
    assert absent_root.attributes["error.type"] == "not_found"
    head = one(in_trace(spans, absent_root), HEAD_MANIFEST)
    assert head.attributes["http.response.status_code"] == 404 and head.attributes["error.type"] == "404"
    assert bad_root.attributes["http.response.status_code"] == 400
    assert bad_root.attributes["error.type"].startswith("bad_filename")
    # A path no route matches has no route template: the span is named by the method alone.
    stray = [s for s in spans if s.kind == SpanKind.SERVER and s.attributes.get("url.path") == "/nothing/here"]
    assert len(stray) == 1 and stray[0].name == "GET" and "http.route" not in stray[0].attributes

    records = download_records(caplog)
    assert [r.fields["status"] for r in records] == [200, 404, 400]
    assert records[1].fields["image"] == f"{registry.host}/{unique_repo}:nosuchtag"
    assert records[1].fields["digest"] is None and records[1].fields["error"] == "not_found"
    assert records[1].fields["trace_id"] == trace_hex(absent_root)


def test_large_download_makes_a_bounded_number_of_spans(registry, unique_repo, tmp_path):
    registry.push_image(unique_repo, "big", [make_layer({"big.bin": os.urandom(5 << 20)})])
    path = f"/registry/http/{registry.host}/docker/{filename_for(unique_repo, 'big')}"

    async def scenario():
        async with serve(embedded_env(tmp_path)) as (_app, client):
            return await client.get(path)

    response = asyncio.run(scenario())
    assert response.status_code == 200 and len(response.content) > 5 << 20
    spans = _EXPORTER.get_finished_spans()
    root = one(spans, ROUTE_REGISTRY)
    assert len(spans) < 30, [s.name for s in spans]
    assert sum(len(s.events) for s in spans) < 10
    assert root.attributes["http.response.body.size"] == len(response.content)


# --------------------------------------------------------------------------- two-tier, job on a thread


def test_two_tier_worker_spans_continue_the_request_trace(registry, unique_repo, two_tier_env, caplog):
    caplog.set_level(logging.INFO, logger="docker_http_passthrough.access")
    image = registry.push_image(unique_repo, "v1", [make_layer({"a.bin": os.urandom(20_000)})])
    path = f"/registry/http/{registry.host}/docker/{filename_for(unique_repo, 'v1')}"

    async def scenario():
        async with serve(two_tier_env) as (_app, client):
            with thread_worker(two_tier_env["REDIS_URL"]):
                return await client.get(path)

    response = asyncio.run(scenario())
    assert response.status_code == 200, response.text
    spans = _EXPORTER.get_finished_spans()
    root = one(spans, ROUTE_REGISTRY)
    assert root.parent is None
    mine = in_trace(spans, root)
    assert [s for s in mine if s.parent is None] == [root]
    worker_names = {"prepare_image", "fetch_config_blob", "download_layer_0", "write_layer_tar_0", GET_BLOB,
                    GET_MANIFEST}
    assert worker_names <= {s.name for s in mine}, {s.name for s in mine}
    for span in mine:
        assert chain(span, mine)[-1] == ROUTE_REGISTRY
    prepared = one(mine, "prepare_image")
    # Crossed Redis: the job's first span hangs directly under the request's route span (a remote parent).
    assert prepared.parent.span_id == root.context.span_id and prepared.parent.is_remote
    assert chain(one(mine, "write_layer_tar_0"), mine) == [
        "write_layer_tar_0", "download_layer_0", "prepare_image", ROUTE_REGISTRY]
    assert len(spans_named(mine, GET_BLOB)) == 2
    waited = one(mine, "wait_for_preparation")
    assert waited.parent.span_id == root.context.span_id
    assert waited.attributes["dhp.job.id"] == root.attributes["dhp.job.id"] == prepared.attributes["dhp.job.id"]
    # Nothing of the job escaped into a trace of its own.
    assert all(s.context.trace_id == root.context.trace_id for s in spans)
    record, = download_records(caplog)
    assert record.fields["trace_id"] == trace_hex(root) and record.fields["cache_hit"] is False
    assert record.fields["digest"] == image.manifest_digest


@pytest.mark.parametrize("tier", ["embedded", "two-tier"])
def test_request_joining_a_running_preparation_links_to_its_starter(tier, registry, unique_repo, tmp_path,
                                                                    request):
    image = registry.push_image(unique_repo, "slow", [make_layer({"slow.bin": os.urandom(120_000)})])
    path = f"/registry/http/{registry.host}/docker/{filename_for(unique_repo, 'slow')}"
    env = request.getfixturevalue("two_tier_env") if tier == "two-tier" else embedded_env(tmp_path)
    registry.proxy.throttle_bytes_per_second = 150_000  # about a second for the layer

    def started(app) -> bool:
        preparer = app.state.preparer
        if tier == "embedded":
            return bool(preparer.running)
        return bool(preparer.sync.keys("rq:job:prepare-*"))

    async def scenario():
        async with serve(env) as (app, client):
            worker = thread_worker(env["REDIS_URL"]) if tier == "two-tier" else contextlib.nullcontext()
            with worker:
                first = asyncio.create_task(client.get(path))
                await wait_until(lambda: started(app))
                second = await client.get(path)
                return await first, second

    first, second = asyncio.run(scenario())
    assert first.status_code == 200 and second.status_code == 200 and first.content == second.content
    spans = _EXPORTER.get_finished_spans()
    starter, joiner = route_spans(spans, ROUTE_REGISTRY)
    assert starter.attributes["dhp.cache.hit"] is False and joiner.attributes["dhp.cache.hit"] is False
    joined_wait = one(in_trace(spans, joiner), "wait_for_preparation")
    assert joined_wait.attributes["dhp.job.joined"] is True
    assert [(link.context.trace_id, link.context.span_id) for link in joined_wait.links] == [
        (starter.context.trace_id, starter.context.span_id)]
    # The work is in the starter's trace only.
    assert len(spans_named(spans, "prepare_image")) == 1
    assert one(spans, "prepare_image").context.trace_id == starter.context.trace_id
    assert not spans_named(in_trace(spans, joiner), GET_BLOB)
    assert image.manifest_digest == joiner.attributes["oci.manifest.digest"]


@pytest.mark.parametrize("tier", ["embedded", "two-tier"])
def test_request_that_starts_a_preparation_does_not_link_to_itself(tier, registry, unique_repo, tmp_path, request):
    registry.push_image(unique_repo, "v1", [make_layer({"a.bin": os.urandom(20_000)})])
    path = f"/registry/http/{registry.host}/docker/{filename_for(unique_repo, 'v1')}"
    env = request.getfixturevalue("two_tier_env") if tier == "two-tier" else embedded_env(tmp_path)

    async def scenario():
        async with serve(env) as (_app, client):
            worker = thread_worker(env["REDIS_URL"]) if tier == "two-tier" else contextlib.nullcontext()
            with worker:
                return await client.get(path)

    assert asyncio.run(scenario()).status_code == 200
    spans = _EXPORTER.get_finished_spans()
    waited = one(spans, "wait_for_preparation")
    assert waited.attributes["dhp.job.joined"] is False, "the starter is not joining anyone's job"
    assert not waited.links, [(format(link.context.span_id, "x")) for link in waited.links]


# --------------------------------------------------------------------------- token auth, one span per attempt


@pytest.fixture
def fresh_auth_caches():
    """The registry client remembers challenges and tokens per process: start without either."""
    registry_module._known_challenges.clear()
    registry_module._token_cache.clear()
    yield
    registry_module._known_challenges.clear()
    registry_module._token_cache.clear()


def test_token_registry_client_spans_per_attempt_and_no_secrets(token_registry, tmp_path, caplog,
                                                                fresh_auth_caches):
    caplog.set_level(logging.DEBUG)
    repo = token_registry.repo("private")
    image = token_registry.registry.push_image(repo, "v1", [make_layer({"secret.txt": b"s3cret layer"})])
    token_registry.reset()
    path = f"/registry-auth/http/{token_registry.host}/docker/{filename_for(repo, 'v1')}"
    basic = "Basic " + base64.b64encode(b"alice:wonderland").decode()

    async def scenario():
        async with serve(embedded_env(tmp_path)) as (_app, client):
            bare = await client.get(path)
            cold = await client.get(path, auth=ALICE)
            warm = await client.get(path, auth=ALICE)
            registry_module._token_cache.clear()  # challenge known, token not: fetched before the first request
            refetch = await client.get(path, headers={"Authorization": basic})
            return bare, cold, warm, refetch

    bare, cold, warm, refetch = asyncio.run(scenario())
    assert bare.status_code == 401 and bare.headers["www-authenticate"].startswith("Basic ")
    assert cold.status_code == warm.status_code == refetch.status_code == 200, cold.text
    spans = _EXPORTER.get_finished_spans()
    bare_root, cold_root, warm_root, refetch_root = route_spans(spans, ROUTE_REGISTRY_AUTH)

    # Without credentials: a challenge, no upstream request.
    assert bare_root.attributes["http.response.status_code"] == 401
    assert bare_root.attributes["registry.client_auth.challenge_sent"] is True
    assert bare_root.attributes["registry.client_auth.credentials_present"] is False
    assert bare_root.attributes["error.type"] == "credentials_required"
    assert not [s for s in in_trace(spans, bare_root) if s.kind == SpanKind.CLIENT]

    # Cold, nothing known about the registry: 401 → token → retry, each attempt its own span, in this order.
    cold_spans = in_trace(spans, cold_root)
    resolve_id = one(cold_spans, "resolve_manifest").context.span_id
    attempts = sorted((s for s in cold_spans if s.parent and s.parent.span_id == resolve_id),
                      key=lambda s: s.start_time)
    assert [(s.name, s.attributes.get("http.request.resend_count"), s.attributes["http.response.status_code"])
            for s in attempts] == [(HEAD_MANIFEST, 0, 401), (TOKEN, None, 200), (HEAD_MANIFEST, 1, 200)]
    first, token, retry = attempts
    assert first.attributes["registry.auth.type"] == "anonymous" and first.attributes["error.type"] == "401"
    assert retry.attributes["registry.auth.type"] == "bearer" and "error.type" not in retry.attributes
    assert token.kind == SpanKind.CLIENT
    assert token.attributes["url.template"] == "{registry_token_endpoint}"
    assert token.attributes["url.full"] == token_registry.tokens.realm  # no query: no scope, no account
    assert token.attributes["registry.operation"] == "token"
    assert token.attributes["registry.auth.type"] == "bearer"
    assert token.attributes["registry.auth.service"] == token_registry.tokens.service
    assert token.attributes["registry.auth.scope_present"] is True
    assert token.attributes["registry.auth.configured"] is True
    assert cold_root.attributes["registry.client_auth.credentials_present"] is True
    assert cold_root.attributes["registry.client_auth.credentials_used"] is True
    assert cold_root.attributes["registry.client_auth.challenge_sent"] is False
    assert cold_root.attributes["registry.auth.configured"] is True
    # The preparation reuses the token: no further token request, every blob request authorized at once.
    assert len(spans_named(cold_spans, TOKEN)) == 1
    blob_spans = spans_named(cold_spans, GET_BLOB)
    assert len(blob_spans) == 2
    assert {(s.attributes["http.request.resend_count"], s.attributes["registry.auth.type"],
             s.attributes["http.response.status_code"]) for s in blob_spans} == {(0, "bearer", 200)}

    # Warm, token cached: one HEAD, authorized on the first attempt.
    warm_clients = [s for s in in_trace(spans, warm_root) if s.kind == SpanKind.CLIENT]
    assert [(s.name, s.attributes["http.request.resend_count"]) for s in warm_clients] == [(HEAD_MANIFEST, 0)]

    # Challenge known, token expired from the cache: the token comes first, then one HEAD.
    refetch_clients = sorted((s for s in in_trace(spans, refetch_root) if s.kind == SpanKind.CLIENT),
                             key=lambda s: s.start_time)
    assert [s.name for s in refetch_clients] == [TOKEN, HEAD_MANIFEST]
    assert refetch_clients[1].attributes["http.request.resend_count"] == 0
    assert refetch_clients[1].attributes["http.response.status_code"] == 200

    # No secret anywhere: spans, and every line our loggers wrote (at DEBUG).
    tokens_issued = [r for r in token_registry.tokens.requests if r.username == "alice"]
    assert tokens_issued, "the token server saw alice"
    assert_no_secrets(spans, "wonderland", basic.split(" ")[1])
    ours = [r for r in caplog.records if r.name.startswith("docker_http_passthrough")]
    assert len(ours) >= 4
    for record in ours:
        text = record.getMessage() + json.dumps(getattr(record, "fields", {}), default=str)
        for needle in ("wonderland", "Bearer ", "eyJ", basic):
            assert needle not in text, (needle, text)
    assert image.manifest_digest == cold_root.attributes["oci.manifest.digest"]


# --------------------------------------------------------------------------- the helpers themselves


def test_context_round_trip_and_links():
    with tracer().start_as_current_span("starter") as span:
        carrier = inject_context()
    assert carrier["traceparent"].split("-")[1] == format(span.get_span_context().trace_id, "032x")
    restored = trace.get_current_span(extract_context(carrier)).get_span_context()
    assert restored.trace_id == span.get_span_context().trace_id and restored.is_remote
    link, = link_to(carrier)
    assert link.context.span_id == span.get_span_context().span_id
    assert link_to(None) == [] and link_to({}) == [] and link_to({"traceparent": "garbage"}) == []
    assert inject_context() == {}  # no current span: nothing to carry
    flush_tracing()  # must not raise with the SDK provider in place


def test_setup_tracing_without_endpoint_installs_nothing():
    before = trace.get_tracer_provider()
    assert setup_tracing("api", {}) is False
    assert setup_tracing("api", {"OTEL_EXPORTER_OTLP_ENDPOINT": ""}) is False
    assert trace.get_tracer_provider() is before


def test_setup_tracing_with_endpoint_in_a_fresh_process():
    code = """
import json
from opentelemetry import trace
from docker_http_passthrough.shared.telemetry import setup_tracing, flush_tracing
assert not setup_tracing("worker", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_SDK_DISABLED": "true"})
assert type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider"
assert setup_tracing("worker", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9", "OTEL_SERVICE_NAME": "dhp-x"})
assert setup_tracing("worker", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})  # once per process
provider = trace.get_tracer_provider()
print(json.dumps({"type": type(provider).__name__, "resource": dict(provider.resource.attributes)}))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False,
                            env={k: v for k, v in os.environ.items() if not k.startswith("OTEL_")})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["type"] == "TracerProvider"
    assert out["resource"]["service.name"] == "dhp-x" and out["resource"]["dhp.tier"] == "worker"


def test_log_level_and_rust_log_alias():
    assert log_level({}) == logging.INFO
    assert log_level({"LOG_LEVEL": "debug"}) == logging.DEBUG
    assert log_level({"RUST_LOG": "warn,hyper=info"}) == logging.WARNING
    assert log_level({"RUST_LOG": "docker_http_passthrough=trace"}) == logging.DEBUG
    assert log_level({"LOG_LEVEL": "error", "RUST_LOG": "debug"}) == logging.ERROR
    assert log_level({"LOG_LEVEL": "nonsense"}) == logging.INFO


def test_json_formatter_structured_fields_and_exceptions():
    record = logging.LogRecord("docker_http_passthrough.access", logging.INFO, __file__, 1, "GET %s", ("/x",), None)
    record.fields = {"event": "download", "bytes": 3, "trace_id": "ab" * 16}
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "GET /x" and entry["bytes"] == 3 and entry["trace_id"] == "ab" * 16
    stamp = datetime.fromisoformat(entry["time"].replace("Z", "+00:00"))  # ISO 8601, UTC, to the millisecond
    assert entry["time"].endswith("Z") and abs(stamp.timestamp() - record.created) < 0.002
    try:
        raise ValueError("boom")
    except ValueError:
        failing = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    entry = json.loads(JsonFormatter().format(failing))
    assert entry["level"] == "error" and "ValueError: boom" in entry["exception"]


# --------------------------------------------------------------------------- the middleware on its own


def _mini_app(handler) -> Starlette:
    routes = [Route("/docker/{filename}", handler, methods=["GET", "HEAD"]), Route("/status/{job_id}", handler)]
    return Starlette(routes=routes, middleware=[Middleware(TelemetryMiddleware)])


async def _call(app, path: str, *, method: str = "GET", spec: str = "2.4", send_fails_after: int | None = None,
                disconnect_after: float | None = None) -> list[dict]:
    """Drive the app like an ASGI server would; a client that hangs up shows as a failing send (spec 2.4) or as
    an http.disconnect message (older servers)."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"host", b"dhp.test:8080"), (b"user-agent", b"switch")],
             "client": ("192.0.2.1", 1234), "server": ("10.0.0.1", 8080)}
    sent: list[dict] = []
    requested = False

    async def receive() -> dict:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(disconnect_after if disconnect_after is not None else 3600)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if send_fails_after is not None and message["type"] == "http.response.body" and \
                len([m for m in sent if m["type"] == "http.response.body"]) >= send_fails_after:
            raise OSError("the client went away")
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def _slow_archive(request):
    request.state.download = {"image": "r.example/app:1", "digest": "sha256:" + "a" * 64, "cache_hit": True}

    async def body():
        for _ in range(40):
            yield b"x" * 1000
            await asyncio.sleep(0.01)

    return StreamingResponse(body(), headers={"content-length": "40000"})


@pytest.mark.parametrize("spec", ["2.4", "2.3"])
def test_client_hanging_up_mid_stream_is_one_span_and_one_incomplete_log_line(spec, caplog):
    caplog.set_level(logging.INFO, logger="docker_http_passthrough.access")
    app = _mini_app(_slow_archive)
    before = REGISTRY.get_sample_value("dhp_http_response_bytes_total", {"route": "/docker/{filename}"}) or 0.0

    async def scenario():
        if spec == "2.4":
            with contextlib.suppress(Exception):
                await _call(app, "/docker/app_1.tar", spec=spec, send_fails_after=5)
        else:
            await _call(app, "/docker/app_1.tar", spec=spec, disconnect_after=0.1)

    asyncio.run(scenario())
    span = one(_EXPORTER.get_finished_spans(), ROUTE_DOCKER)
    assert len(_EXPORTER.get_finished_spans()) == 1
    assert span.attributes["error.type"] == "connection_closed"
    assert span.status.status_code.name == "ERROR"
    assert 0 < span.attributes["http.response.body.size"] < 40_000
    assert span.attributes["server.address"] == "dhp.test" and span.attributes["server.port"] == 8080
    record, = download_records(caplog)
    assert record.fields["complete"] is False and record.fields["bytes"] == span.attributes["http.response.body.size"]
    assert record.fields["trace_id"] == trace_hex(span) and "connection closed early" in record.getMessage()
    after = REGISTRY.get_sample_value("dhp_http_response_bytes_total", {"route": "/docker/{filename}"})
    assert after - before == record.fields["bytes"]  # what really went out


def test_route_that_raises_and_method_not_allowed(caplog):
    caplog.set_level(logging.INFO, logger="docker_http_passthrough.access")

    async def broken(request):
        raise RuntimeError("bug")

    app = _mini_app(broken)

    async def scenario():
        with pytest.raises(RuntimeError):
            await _call(app, "/docker/app_1.tar")
        return await _call(app, "/status/prepare-x", method="DELETE")

    not_allowed = asyncio.run(scenario())
    assert not_allowed[0]["status"] == 405
    crashed = one(_EXPORTER.get_finished_spans(), ROUTE_DOCKER)
    assert crashed.attributes["error.type"] == "RuntimeError"
    assert crashed.attributes["http.response.status_code"] == 500
    record, = download_records(caplog)
    assert record.fields["status"] == 500 and record.fields["error"] == "RuntimeError"
    refused = one(_EXPORTER.get_finished_spans(), "DELETE /status/{job_id}")
    assert refused.attributes["http.route"] == "/status/{job_id}"
    assert refused.attributes["http.response.status_code"] == 405
    assert "error.type" not in refused.attributes


def test_probes_make_no_spans_but_are_counted():
    """/health every few seconds and /metrics scrapes would bury the downloads' traces."""
    async def ok(request):
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/health", ok), Route("/metrics", ok), Route("/status/{job_id}", ok)],
                    middleware=[Middleware(TelemetryMiddleware)])

    async def scenario():
        for path in ("/health", "/metrics", "/status/prepare-x"):
            sent = await _call(app, path)
            assert sent[0]["status"] == 200

    asyncio.run(scenario())
    assert [span.name for span in _EXPORTER.get_finished_spans()] == ["GET /status/{job_id}"]
