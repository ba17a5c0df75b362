"""Tracing and logging helpers, and the telemetry middleware on its own: a tiny Starlette app driven message by
message as an ASGI server would, so a client hanging up mid-stream can be staged exactly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
from datetime import datetime

import pytest
from opentelemetry import trace
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from docker_http_passthrough.api.observability import TelemetryMiddleware
from docker_http_passthrough.cli import log_level
from docker_http_passthrough.shared.telemetry import (
    JsonFormatter,
    extract_context,
    flush_tracing,
    inject_context,
    link_to,
    setup_tracing,
    tracer,
)
from tests.support.asgi import drive_asgi
from tests.support.services import REPO_ROOT
from tests.support.spans import download_records, one, trace_hex

ROUTE_DOCKER = "GET /docker/{filename}"


# --------------------------------------------------------------------------- the helpers themselves


def test_trace_context_survives_a_job_payload_and_links_to_its_starter(exporter):
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


def test_log_level_comes_from_log_level_or_rust_log():
    assert log_level({}) == logging.INFO
    assert log_level({"LOG_LEVEL": "debug"}) == logging.DEBUG
    assert log_level({"RUST_LOG": "warn,hyper=info"}) == logging.WARNING
    assert log_level({"RUST_LOG": "docker_http_passthrough=trace"}) == logging.DEBUG
    assert log_level({"LOG_LEVEL": "error", "RUST_LOG": "debug"}) == logging.ERROR
    assert log_level({"LOG_LEVEL": "nonsense"}) == logging.INFO


def test_json_log_lines_carry_fields_utc_time_and_exceptions():
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


async def _slow_archive(request):
    request.state.download = {"image": "r.example/app:1", "digest": "sha256:" + "a" * 64, "cache_hit": True}

    async def body():
        for _ in range(40):
            yield b"x" * 1000
            await asyncio.sleep(0.01)

    return StreamingResponse(body(), headers={"content-length": "40000"})


@pytest.mark.parametrize("spec", ["2.4", "2.3"])
def test_client_hanging_up_mid_stream_is_one_span_and_one_incomplete_log_line(exporter, spec, caplog):
    caplog.set_level(logging.INFO, logger="docker_http_passthrough.access")
    app = _mini_app(_slow_archive)
    before = REGISTRY.get_sample_value("dhp_http_response_bytes_total", {"route": "/docker/{filename}"}) or 0.0

    async def scenario():
        if spec == "2.4":
            with contextlib.suppress(Exception):
                await drive_asgi(app, "/docker/app_1.tar", spec=spec, send_fails_after=5)
        else:
            await drive_asgi(app, "/docker/app_1.tar", spec=spec, disconnect_after=0.1)

    asyncio.run(scenario())
    span = one(exporter.get_finished_spans(), ROUTE_DOCKER)
    assert len(exporter.get_finished_spans()) == 1
    assert span.attributes["error.type"] == "connection_closed"
    assert span.status.status_code.name == "ERROR"
    assert 0 < span.attributes["http.response.body.size"] < 40_000
    assert span.attributes["server.address"] == "dhp.test" and span.attributes["server.port"] == 8080
    record, = download_records(caplog)
    assert record.fields["complete"] is False and record.fields["bytes"] == span.attributes["http.response.body.size"]
    assert record.fields["trace_id"] == trace_hex(span) and "connection closed early" in record.getMessage()
    after = REGISTRY.get_sample_value("dhp_http_response_bytes_total", {"route": "/docker/{filename}"})
    assert after - before == record.fields["bytes"]  # what really went out


def test_crashing_route_is_an_error_span_and_a_refused_method_is_not(exporter, caplog):
    caplog.set_level(logging.INFO, logger="docker_http_passthrough.access")

    async def broken(request):
        raise RuntimeError("bug")

    app = _mini_app(broken)

    async def scenario():
        with pytest.raises(RuntimeError):
            await drive_asgi(app, "/docker/app_1.tar")
        return await drive_asgi(app, "/status/prepare-x", method="DELETE")

    not_allowed = asyncio.run(scenario())
    assert not_allowed[0]["status"] == 405
    crashed = one(exporter.get_finished_spans(), ROUTE_DOCKER)
    assert crashed.attributes["error.type"] == "RuntimeError"
    assert crashed.attributes["http.response.status_code"] == 500
    record, = download_records(caplog)
    assert record.fields["status"] == 500 and record.fields["error"] == "RuntimeError"
    refused = one(exporter.get_finished_spans(), "DELETE /status/{job_id}")
    assert refused.attributes["http.route"] == "/status/{job_id}"
    assert refused.attributes["http.response.status_code"] == 405
    assert "error.type" not in refused.attributes


def test_probes_make_no_spans_but_are_counted(exporter):
    """/health every few seconds and /metrics scrapes would bury the downloads' traces."""
    async def ok(request):
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/health", ok), Route("/metrics", ok), Route("/status/{job_id}", ok)],
                    middleware=[Middleware(TelemetryMiddleware)])

    async def scenario():
        for path in ("/health", "/metrics", "/status/prepare-x"):
            sent = await drive_asgi(app, path)
            assert sent[0]["status"] == 200

    asyncio.run(scenario())
    assert [span.name for span in exporter.get_finished_spans()] == ["GET /status/{job_id}"]
