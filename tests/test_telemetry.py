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

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

from docker_http_passthrough.shared.telemetry import JsonFormatter
from tests.support.asgi import CLIENT_ADDRESS, app_in_process, embedded_env, thread_worker, wait_for
from tests.support.downloads import image_url
from tests.support.images import make_layer
from tests.support.spans import (
    assert_no_secrets,
    chain,
    download_records,
    in_trace,
    one,
    route_spans,
    spans_named,
    trace_hex,
)

ROUTE_DOCKER = "GET /docker/{filename}"
ROUTE_REGISTRY = "GET /registry/{scheme}/{host}/docker/{filename}"
ROUTE_REGISTRY_AUTH = "GET /registry-auth/{scheme}/{host}/docker/{filename}"
HEAD_MANIFEST = "HEAD /v2/{repository}/manifests/{reference}"
GET_MANIFEST = "GET /v2/{repository}/manifests/{reference}"
GET_BLOB = "GET /v2/{repository}/blobs/{digest}"
TOKEN = "GET {registry_token_endpoint}"
ALICE = ("alice", "wonderland")


@pytest.fixture
def two_tier_env(redis_server, tmp_path, monkeypatch) -> dict[str, str]:
    """The job reads its settings from os.environ (as a worker process does): share cache and Redis with the API.
    PREPARE_GRACE=0: the trace of a preparation the request waits for (an early start adds size probes)."""
    env = {"CACHE_DIR": str(tmp_path / "cache"), "REDIS_URL": redis_server.url, "PREPARE_GRACE": "0"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


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


def test_cold_and_warm_downloads_trace_every_step_under_one_route_span(exporter, registry, unique_repo, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="docker_http_passthrough.access")
    image = registry.push_image(unique_repo, "v1", [make_layer({"a.bin": os.urandom(50_000)}),
                                                    make_layer({"b.txt": b"b"})])
    path = image_url("", registry.host, unique_repo, "v1")

    async def scenario():
        # PREPARE_GRACE=0: the trace of a preparation the request waits for (an early start adds size probes).
        async with app_in_process(embedded_env(tmp_path, PREPARE_GRACE="0")) as (_app, client):
            cold = await client.get(path)
            warm = await client.get(path)
            return cold, warm

    cold, warm = asyncio.run(scenario())
    assert cold.status_code == 200 and warm.status_code == 200 and cold.content == warm.content
    spans = exporter.get_finished_spans()
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
    # A single-platform image: resolving it reads its manifest and config (small blobs) to check the platform;
    # the preparation finds them stored.
    assert chain(one(cold_spans, GET_MANIFEST), cold_spans) == [GET_MANIFEST, "resolve_manifest", ROUTE_REGISTRY]
    assert blob_chains == sorted([("fetch_config_blob", "resolve_manifest", ROUTE_REGISTRY),
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
    fetched, stored = sorted(spans_named(cold_spans, "fetch_config_blob"), key=lambda s: s.start_time)
    assert fetched.attributes["oci.image.config.digest"] == stored.attributes["oci.image.config.digest"] \
        == image.config_digest
    assert (fetched.attributes["dhp.cache.hit"], stored.attributes["dhp.cache.hit"]) == (False, True)
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


def test_default_registry_route_and_its_errors_are_traced_and_logged(exporter, registry, unique_repo, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="docker_http_passthrough.access")
    registry.push_image(unique_repo, "v1", [make_layer({"x": b"x"})])
    env = embedded_env(tmp_path, REGISTRY_URL=registry.url, REGISTRY_DEFAULT_NAMESPACE="test")
    name = unique_repo.removeprefix("test/")

    async def scenario():
        async with app_in_process(env) as (_app, client):
            ok = await client.get(f"/docker/{name}_v1.tar")
            absent = await client.get(f"/docker/{name}_nosuchtag.tar")
            bad = await client.get("/docker/no-tag-here.tar")
            unmatched = await client.get("/nothing/here")
            return ok, absent, bad, unmatched

    ok, absent, bad, unmatched = asyncio.run(scenario())
    assert (ok.status_code, absent.status_code, bad.status_code, unmatched.status_code) == (200, 404, 400, 404)
    spans = exporter.get_finished_spans()
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


def test_large_download_makes_a_bounded_number_of_spans(exporter, registry, unique_repo, tmp_path):
    registry.push_image(unique_repo, "big", [make_layer({"big.bin": os.urandom(5 << 20)})])
    path = image_url("", registry.host, unique_repo, "big")

    async def scenario():
        async with app_in_process(embedded_env(tmp_path)) as (_app, client):
            return await client.get(path)

    response = asyncio.run(scenario())
    assert response.status_code == 200 and len(response.content) > 5 << 20
    spans = exporter.get_finished_spans()
    root = one(spans, ROUTE_REGISTRY)
    assert len(spans) < 30, [s.name for s in spans]
    assert sum(len(s.events) for s in spans) < 10
    assert root.attributes["http.response.body.size"] == len(response.content)


# --------------------------------------------------------------------------- two-tier, job on a thread


def test_two_tier_worker_spans_continue_the_request_trace(exporter, registry, unique_repo, two_tier_env, caplog):
    caplog.set_level(logging.INFO, logger="docker_http_passthrough.access")
    image = registry.push_image(unique_repo, "v1", [make_layer({"a.bin": os.urandom(20_000)})])
    path = image_url("", registry.host, unique_repo, "v1")

    async def scenario():
        async with app_in_process(two_tier_env) as (_app, client):
            with thread_worker(two_tier_env["REDIS_URL"]):
                return await client.get(path)

    response = asyncio.run(scenario())
    assert response.status_code == 200, response.text
    spans = exporter.get_finished_spans()
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
def test_request_joining_a_running_preparation_links_to_its_starter(exporter, tier, registry, unique_repo, tmp_path,
                                                                    request):
    image = registry.push_image(unique_repo, "slow", [make_layer({"slow.bin": os.urandom(120_000)})])
    path = image_url("", registry.host, unique_repo, "slow")
    env = request.getfixturevalue("two_tier_env") if tier == "two-tier" else embedded_env(tmp_path)
    registry.proxy.throttle_bytes_per_second = 150_000  # about a second for the layer

    def started(app) -> bool:
        preparer = app.state.preparer
        if tier == "embedded":
            return bool(preparer.running)
        return bool(preparer.queue.connection.keys("rq:job:prepare-*"))

    async def scenario():
        async with app_in_process(env) as (app, client):
            worker = thread_worker(env["REDIS_URL"]) if tier == "two-tier" else contextlib.nullcontext()
            with worker:
                first = asyncio.create_task(client.get(path))
                await wait_for(lambda: started(app))
                second = await client.get(path)
                return await first, second

    first, second = asyncio.run(scenario())
    assert first.status_code == 200 and second.status_code == 200 and first.content == second.content
    spans = exporter.get_finished_spans()
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
def test_request_that_starts_a_preparation_does_not_link_to_itself(exporter, tier, registry, unique_repo, tmp_path, request):
    registry.push_image(unique_repo, "v1", [make_layer({"a.bin": os.urandom(20_000)})])
    path = image_url("", registry.host, unique_repo, "v1")
    env = request.getfixturevalue("two_tier_env") if tier == "two-tier" else embedded_env(tmp_path)

    async def scenario():
        async with app_in_process(env) as (_app, client):
            worker = thread_worker(env["REDIS_URL"]) if tier == "two-tier" else contextlib.nullcontext()
            with worker:
                return await client.get(path)

    assert asyncio.run(scenario()).status_code == 200
    spans = exporter.get_finished_spans()
    waited = one(spans, "wait_for_preparation")
    assert waited.attributes["dhp.job.joined"] is False, "the starter is not joining anyone's job"
    assert not waited.links, [(format(link.context.span_id, "x")) for link in waited.links]


# --------------------------------------------------------------------------- token auth, one span per attempt


def test_token_registry_client_spans_per_attempt_and_no_secrets(exporter, token_registry, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    repo = token_registry.repo("private")
    image = token_registry.registry.push_image(repo, "v1", [make_layer({"secret.txt": b"s3cret layer"})])
    token_registry.reset()
    path = image_url("", token_registry.host, repo, "v1", route="registry-auth")
    basic = "Basic " + base64.b64encode(b"alice:wonderland").decode()

    async def scenario():
        # A new app knows no challenge or token; PREPARE_GRACE=0: no early start (its size probes add requests).
        async with app_in_process(embedded_env(tmp_path, PREPARE_GRACE="0")) as (app, client):
            bare = await client.get(path)
            cold = await client.get(path, auth=ALICE)
            warm = await client.get(path, auth=ALICE)
            app.state.registries.auth.tokens.clear()  # challenge known, token not: fetched before the first request
            refetch = await client.get(path, headers={"Authorization": basic})
            return bare, cold, warm, refetch

    bare, cold, warm, refetch = asyncio.run(scenario())
    assert bare.status_code == 401 and bare.headers["www-authenticate"].startswith("Basic ")
    assert cold.status_code == warm.status_code == refetch.status_code == 200, cold.text
    spans = exporter.get_finished_spans()
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
    attempts = sorted((s for s in cold_spans if s.parent and s.parent.span_id == resolve_id
                       and s.name in (HEAD_MANIFEST, TOKEN)), key=lambda s: s.start_time)
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
