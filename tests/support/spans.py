"""Spans caught in memory, and the helpers that read them: where a span sits, what it carries.

The global tracer provider can be set once per process, so ``capture_spans()`` installs an SDK provider only if
there is none yet and adds an in-memory exporter to it. This module is a pytest plugin (see tests/conftest.py):
a test that takes the ``exporter`` fixture gets the spans ended during that test.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind


@contextlib.contextmanager
def capture_spans() -> Iterator[InMemorySpanExporter]:
    """Every span ended inside the block is kept by the exporter; afterwards it is shut down and keeps nothing."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    assert trace.get_tracer_provider() is provider, "another tracer provider was installed first"
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        yield exporter
    finally:
        exporter.clear()
        exporter.shutdown()


@pytest.fixture(scope="module")
def _span_capture() -> Iterator[InMemorySpanExporter]:
    with capture_spans() as exporter:
        yield exporter


@pytest.fixture
def exporter(_span_capture: InMemorySpanExporter) -> InMemorySpanExporter:
    """The spans ended during this test, in memory (an SDK tracer provider is installed if there is none)."""
    _span_capture.clear()
    return _span_capture


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


def download_records(caplog) -> list[logging.LogRecord]:
    """The access log's download lines that pytest's caplog caught."""
    return [r for r in caplog.records if r.name == "docker_http_passthrough.access"
            and (getattr(r, "fields", None) or {}).get("event") == "download"]
