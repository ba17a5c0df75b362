"""Traces (OpenTelemetry) and log format, the same for both tiers.

Tracing is on only when OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set (OTLP gRPC);
otherwise the API's no-op tracer is used and spans cost next to nothing. Trace context crosses the API → job → worker hop in the job's meta.
No span attribute ever carries a secret: URLs are built without userinfo or query, no headers are recorded.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from typing import Mapping

from opentelemetry import propagate, trace
from opentelemetry.trace import Link

TRACER_NAME = "docker_http_passthrough"
DEFAULT_SERVICE_NAME = "docker-http-passthrough"

_provider_pid: int | None = None


def setup_tracing(role: str, env: Mapping[str, str] | None = None) -> bool:
    """Install an OTLP exporter if configured; once per process (a forked process sets up its own)."""
    global _provider_pid
    env = os.environ if env is None else env
    if _provider_pid == os.getpid():
        return True
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint or (env.get("OTEL_SDK_DISABLED") or "").strip().lower() == "true":
        return False
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME,
                                "service.namespace": DEFAULT_SERVICE_NAME, "dhp.tier": role})
    provider = TracerProvider(resource=resource)
    # The exporter decides TLS the standard way: http:// → plain, https:// → TLS, else OTEL_EXPORTER_OTLP_INSECURE.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
    if trace.get_tracer_provider() is not provider:  # someone installed one first; theirs stays
        provider.shutdown()
        return False
    _provider_pid = os.getpid()
    return True


def flush_tracing(timeout_ms: int = 5000) -> None:
    """Send buffered spans now (end of each job; a forked RQ work horse would leave with os._exit())."""
    provider = trace.get_tracer_provider()
    flush = getattr(provider, "force_flush", None)
    if flush is not None:
        flush(timeout_ms)


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def inject_context() -> dict[str, str]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def extract_context(carrier: Mapping[str, str] | None):
    return propagate.extract(dict(carrier or {}))


def link_to(carrier: Mapping[str, str] | None) -> list[Link]:
    """A link to the span whose context is in `carrier` (the request that started a shared job)."""
    context = trace.get_current_span(extract_context(carrier)).get_span_context()
    return [Link(context)] if context.is_valid else []


def current_trace_id() -> str | None:
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `extra={"fields": {...}}` adds structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            # ISO 8601 in UTC with milliseconds: sortable, and unambiguous across hosts and time zones.
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def configure_logging(level: int, json_format: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_format else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO; our own lines say what matters.
    logging.getLogger("httpx").setLevel(logging.WARNING)
