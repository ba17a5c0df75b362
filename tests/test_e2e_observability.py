"""Observability end to end: real server and worker processes export spans over OTLP/gRPC to a receiver started
by the test, serve Prometheus metrics, and write access log lines (JSON with LOG_FORMAT=json)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.downloads import get, image_url
from tests.support.images import make_layer
from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.support.services import WorkerProcess, free_port

pytestmark = pytest.mark.e2e

ROUTE = "GET /registry/{scheme}/{host}/docker/{filename}"
ROUTE_TEMPLATE = "/registry/{scheme}/{host}/docker/{filename}"
SERVER, CLIENT = 2, 3  # OTLP SpanKind values
# The manifest and config GETs are the API's (resolving a single-platform image checks its config's platform).
WORKER_SPANS = {"prepare_image", "fetch_config_blob", "download_layer_0", "write_layer_tar_0", "download_layer_1",
                "write_layer_tar_1", "GET /v2/{repository}/blobs/{digest}"}


def chain(span: ReceivedSpan, spans: list[ReceivedSpan]) -> list[str]:
    by_id = {s.span_id: s for s in spans}
    names = [span.name]
    while span.parent_span_id:
        span = by_id.get(span.parent_span_id)
        assert span is not None, f"{names[-1]!r} has a parent that never arrived: {names}"
        names.append(span.name)
    return names


def json_lines(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"LOG_FORMAT=json wrote a line that is not JSON: {line!r}") from None
    return parsed


@pytest.fixture
def collector() -> Iterator[OtlpReceiver]:
    """An OTLP/gRPC trace receiver on a free loopback port, as a collector would be."""
    with OtlpReceiver() as receiver:
        yield receiver


def log_entries(running, downloads: int, timeout: float = 10.0) -> list[dict]:
    """The server's JSON log once it holds `downloads` access lines: a line is written after the last byte went
    out, so a client that has its response may be a moment ahead of it."""
    deadline = time.monotonic() + timeout
    while True:
        entries = json_lines(running.server.log_text())
        if len([e for e in entries if e.get("event") == "download"]) >= downloads or time.monotonic() > deadline:
            return entries
        time.sleep(0.05)


def test_spans_of_both_tiers_reach_an_otlp_collector_in_one_trace(stack, registry, unique_repo, collector):
    image = registry.push_image(unique_repo, "v1", [make_layer({"a.txt": b"a" * 5000}), make_layer({"b": b"b"})])
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_SERVICE_NAME": "dhp-e2e",
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # the API's batch exporter sends within 0.2 s, not 5 s
        "LOG_FORMAT": "json",
        "WORKER_METRICS_PORT": "0",
        "PREPARE_GRACE": "0",  # the API waits for the worker (an early start would add its size probes' spans)
    }
    running = stack("two-tier", workers=0, env=env)
    # The worker's batch exporter would wait a minute: only the flush before the work horse's os._exit() can deliver
    # its spans within the 15 s below.
    worker_env = {**running.worker_env(), "OTEL_BSP_SCHEDULE_DELAY": "60000"}
    worker = WorkerProcess(worker_env, running.log_dir / "worker-0.log")
    running.workers.append(worker)
    url = image_url(running.url, registry.host, unique_repo, "v1")

    cold = get(url)
    assert cold.status == 200, cold.body[:300]

    def arrived(spans: list[ReceivedSpan]) -> bool:
        roots = [s for s in spans if s.name == ROUTE and s.tier == "api"]
        return bool(roots) and WORKER_SPANS <= {s.name for s in spans
                                                if s.tier == "worker" and s.trace_id == roots[0].trace_id}

    spans = collector.wait_for(arrived, timeout=15)
    root = next(s for s in spans if s.name == ROUTE)
    assert root.kind == SERVER and root.parent_span_id == ""
    assert root.attributes["http.route"] == ROUTE_TEMPLATE
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["oci.manifest.digest"] == image.manifest_digest
    assert root.attributes["dhp.cache.hit"] is False
    mine = [s for s in spans if s.trace_id == root.trace_id]
    assert {s.service for s in spans} == {"dhp-e2e"}
    assert {s.tier for s in mine} == {"api", "worker"}
    api_names = {s.name for s in mine if s.tier == "api"}
    assert {"parse_image_request", "extract_registry_client_credentials", "resolve_manifest",
            "HEAD /v2/{repository}/manifests/{reference}", "wait_for_preparation"} <= api_names
    assert "prepare_image" not in api_names and "GET /v2/{repository}/manifests/{reference}" in api_names
    api_blobs = [s for s in mine if s.tier == "api" and s.name == "GET /v2/{repository}/blobs/{digest}"]
    assert [s.attributes["url.full"].rsplit("/", 1)[1] for s in api_blobs] == [image.config_digest], \
        "the API reads the config (to check the platform), never a layer"
    for span in mine:
        assert chain(span, mine)[-1] == ROUTE, chain(span, mine)
    prepared = next(s for s in mine if s.name == "prepare_image")
    assert prepared.tier == "worker" and prepared.parent_span_id == root.span_id
    assert prepared.attributes["dhp.job.id"] == root.attributes["dhp.job.id"]
    blobs = [s for s in mine if s.name == "GET /v2/{repository}/blobs/{digest}"]
    assert len(blobs) == 3 and {s.kind for s in blobs} == {CLIENT}
    assert {s.attributes["url.full"].rsplit("/", 1)[1] for s in blobs} == {
        image.config_digest, *(layer.digest for layer in image.layers)}
    assert [s for s in mine if s.parent_span_id == ""] == [root], "one root in the download's trace"
    assert {s.trace_id for s in spans if s.tier == "worker"} == {root.trace_id}, "no worker span outside it"

    # The access line (JSON) carries the same trace id.
    entries = log_entries(running, 1)
    downloads = [e for e in entries if e.get("event") == "download"]
    assert len(downloads) == 1, entries
    line = downloads[0]
    assert line["trace_id"] == root.trace_id
    assert line["image"] == f"{registry.host}/{unique_repo}:v1" and line["digest"] == image.manifest_digest
    assert line["status"] == 200 and line["bytes"] == len(cold.body) and line["cache_hit"] is False
    assert line["duration_s"] >= 0 and line["level"] == "info"

    worker_entries = json_lines(worker.log_text())  # RQ's own lines too: JSON, as LOG_FORMAT says
    assert any(e["logger"].startswith("rq.") for e in worker_entries), worker_entries

    # Warm: a new trace, from the API alone.
    collector_count = len(spans)
    assert get(url).status == 200
    spans = collector.wait_for(lambda s: len([x for x in s if x.name == ROUTE]) == 2)
    warm_root = [s for s in spans if s.name == ROUTE][1]
    assert warm_root.trace_id != root.trace_id and warm_root.attributes["dhp.cache.hit"] is True
    assert {s.tier for s in spans[collector_count:] if s.trace_id == warm_root.trace_id} == {"api"}


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text[:300]
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum over every label set that includes `labels` (e.g. all pids of a multiprocess gauge)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


def test_metrics_after_a_cold_and_a_warm_download(mode, stack, registry, unique_repo):
    image = registry.push_image(unique_repo, "v1", [make_layer({"a.bin": b"a" * 300_000}),
                                                    make_layer({"b.txt": b"b"})])
    worker_port = free_port()
    running = stack(mode, workers=1, env={"WORKER_METRICS_PORT": str(worker_port)})
    url = image_url(running.url, registry.host, unique_repo, "v1")

    cold, warm = get(url), get(url)
    assert cold.status == warm.status == 200 and cold.body == warm.body
    size = len(cold.body)
    api = scrape(f"{running.url}/metrics")

    assert value(api, "dhp_http_requests_total", route=ROUTE_TEMPLATE, method="GET", status="200") == 2
    assert value(api, "dhp_http_response_bytes_total", route=ROUTE_TEMPLATE) == 2 * size
    assert value(api, "dhp_cache_requests_total", result="miss") == 1
    assert value(api, "dhp_cache_requests_total", result="hit") == 1
    assert value(api, "dhp_upstream_requests_total", operation="manifest_head", status="200") == 2
    layer_files = list((Path(running.cache_dir) / "layers" / "sha256").iterdir())
    assert len(layer_files) == 2
    assert value(api, "dhp_store_layer_bytes") == sum(p.stat().st_size for p in layer_files)
    assert value(api, "dhp_store_layer_bytes") == sum(len(layer.tar) for layer in image.layers)
    blobs = 1 + len(image.layers)  # config + layers

    if mode == "embedded":
        assert value(api, "dhp_upstream_requests_total", operation="blob_get", status="200") == blobs
        assert value(api, "dhp_upstream_requests_total", operation="manifest_get", status="200") == 1
        assert value(api, "dhp_prepare_duration_seconds_count") == 1
        assert value(api, "dhp_jobs_in_flight") == 0
        return

    # Two-tier: the API resolved (for a single-platform image that reads the manifest and the config, to check
    # its platform); the worker downloaded the layers, and says so on its own port.
    assert value(api, "dhp_queue_depth") == 0
    assert value(api, "dhp_upstream_requests_total", operation="blob_get", status="200") == 1
    assert value(api, "dhp_upstream_requests_total", operation="manifest_get", status="200") == 1
    assert not value(api, "dhp_prepare_duration_seconds_count")
    worker = scrape(f"http://127.0.0.1:{worker_port}/metrics")
    assert total(worker, "dhp_upstream_requests_total", operation="blob_get", status="200") == blobs - 1
    assert not total(worker, "dhp_upstream_requests_total", operation="manifest_get", status="200")
    assert total(worker, "dhp_prepare_duration_seconds_count") == 1
    # Every blob byte received (a resumed or repeated byte would count again): the API read the config, the
    # worker the layers.
    assert value(api, "dhp_upstream_bytes_total") == len(image.config)
    assert total(worker, "dhp_upstream_bytes_total") == sum(layer.size for layer in image.layers)
    assert total(worker, "dhp_jobs_in_flight") == 0


def test_json_logs_obey_rust_log_and_log_level(stack, registry, unique_repo):
    registry.push_image(unique_repo, "v1", [make_layer({"a": b"a"})])
    quiet = stack("embedded", env={"LOG_FORMAT": "json", "RUST_LOG": "warn,hyper=info"})
    chatty = stack("embedded", env={"LOG_FORMAT": "json", "LOG_LEVEL": "debug"})
    for running in (quiet, chatty):
        assert get(image_url(running.url, registry.host, unique_repo, "v1")).status == 200
        assert get(image_url(running.url, registry.host, unique_repo, "missing")).status == 404

    chatty_entries = log_entries(chatty, 2)
    downloads = [e for e in chatty_entries if e.get("event") == "download"]
    assert [(e["status"], e["cache_hit"]) for e in downloads] == [(200, False), (404, None)]
    assert all(e["trace_id"] is None for e in downloads)  # tracing off: no trace id
    assert downloads[1]["error"] == "not_found" and downloads[1]["image"].endswith(f"{unique_repo}:missing")
    assert any(e["level"] == "debug" for e in chatty_entries)

    # By now the quiet server would have written its lines too (it answered first).
    quiet_entries = log_entries(quiet, 1, timeout=0.5)
    assert not [e for e in quiet_entries if e.get("event") == "download"], "RUST_LOG=warn drops INFO lines"
    assert all(e["level"] in ("warning", "error", "critical") for e in quiet_entries), quiet_entries
