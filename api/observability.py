"""Per-request telemetry: one server span per request (never one per ASGI message), metrics, and one log
line per download, written when its last byte has gone out (or the connection broke)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from opentelemetry.trace import INVALID_SPAN, SpanKind, Status, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from docker_http_passthrough.api.zero_copy import ZERO_COPY
from docker_http_passthrough.shared.metrics import BYTES_SERVED, CACHE, QUEUE_DEPTH, REQUESTS, STORE_BYTES, exposition
from docker_http_passthrough.shared.telemetry import current_trace_id, tracer

log = logging.getLogger("docker_http_passthrough.access")

UNTRACED_PATHS = ("/health", "/metrics")
DOWNLOAD_PREFIXES = ("/docker/", "/registry/", "/registry-auth/", "/ref/", "/ref-auth/", "/platform/")
# How a client that hangs up shows: the server cancels the request, or a send fails.
_DISCONNECTS = (OSError, ClientDisconnect, asyncio.CancelledError)


def _route_template(scope: Scope) -> str | None:
    """The matched route's template; for a path whose route wants another method (405), that route's."""
    partial = None
    for route in getattr(scope.get("app"), "routes", ()):
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return route.path
        if match == Match.PARTIAL and partial is None:
            partial = route.path
    return partial


def _host_and_port(scope: Scope, headers: dict[str, str]) -> tuple[str, int | None]:
    """server.address/server.port: the host the client asked for (Host header), else the socket's address."""
    host = headers.get("host", "").strip()
    if host:
        if host.startswith("["):  # [v6]:port
            name, _, rest = host[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ""
        else:
            name, _, port = host.partition(":")
        return name, int(port) if port.isdigit() else (443 if scope.get("scheme") == "https" else 80)
    server = scope.get("server") or (None, None)
    return server[0] or "", server[1] or None


def _request_attributes(scope: Scope, headers: dict[str, str], template: str | None) -> dict:
    """The server span's attributes known before the app runs (only what is known: an empty string or port 0
    would be wrong, not missing)."""
    address, port = _host_and_port(scope, headers)
    client = scope.get("client") or (None, None)
    attributes = {
        "http.request.method": scope["method"], "url.path": scope["path"], "url.scheme": scope.get("scheme", "http"),
        "network.protocol.name": "http", "network.protocol.version": scope.get("http_version", "1.1"),
        "network.transport": "tcp",
    }
    for name, value in (("http.route", template), ("server.address", address), ("server.port", port),
                        ("client.address", client[0]), ("network.peer.address", client[0]),
                        ("network.peer.port", client[1]), ("user_agent.original", headers.get("user-agent"))):
        if value:
            attributes[name] = value
    if scope["path"].startswith(DOWNLOAD_PREFIXES):
        # Known before the route runs, so present even when it fails early (e.g. 401 credentials_required).
        attributes["registry.client_auth.credentials_present"] = "authorization" in headers
        settings = getattr(getattr(scope.get("app"), "state", None), "settings", None)
        if settings is not None:
            attributes["registry.client_auth.mode"] = settings.registry_client_auth
    return attributes


class _ResponseRecorder:
    """Wraps `send`: what the response said (status, challenge) and how much of it went out."""

    def __init__(self, send: Send):
        self._send = send
        self.status = 500
        self.bytes = 0
        self.challenge = False
        self.finished = False  # the last body message went out (a client that hangs up never gets it)

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
            self.challenge = any(k.lower() == b"www-authenticate" for k, _ in message.get("headers", ()))
        await self._send(message)
        if kind == "http.response.body":
            self.bytes += len(message.get("body", b""))
            if not message.get("more_body", False):
                self.finished = True
        elif kind == ZERO_COPY:
            self.bytes += message["count"]


class TelemetryMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        template = _route_template(scope)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        attributes = _request_attributes(scope, headers, template)
        started = time.monotonic()
        recorder = _ResponseRecorder(send)
        scope.setdefault("state", {})
        # One span per request, started here and ended when the last byte went out: never one per ASGI message.
        # Probes (/health every few seconds, /metrics scrapes) would only bury the downloads: no span for them.
        method = scope["method"]
        span_context = tracer().start_as_current_span(f"{method} {template}" if template else method,
                                                      kind=SpanKind.SERVER, attributes=attributes) \
            if scope["path"] not in UNTRACED_PATHS else contextlib.nullcontext(INVALID_SPAN)
        with span_context as span:
            failure: BaseException | None = None
            try:
                await self.app(scope, receive, recorder.send)
            except BaseException as exc:
                failure = exc
                raise
            finally:
                self._finish(scope, span, template, recorder, failure, time.monotonic() - started)

    def _finish(self, scope: Scope, span, template: str | None, recorder: _ResponseRecorder,
                failure: BaseException | None, seconds: float) -> None:
        """The span's response attributes and status, the request counter, and the download's log line."""
        status = recorder.status
        download = scope["path"].startswith(DOWNLOAD_PREFIXES)
        completed = failure is None and recorder.finished
        span.set_attribute("http.response.status_code", status)
        span.set_attribute("http.response.body.size", recorder.bytes)
        noted = scope["state"].get("span_attributes") or {}
        for name, value in noted.items():
            span.set_attribute(name, value)
        if download:
            span.set_attribute("registry.client_auth.challenge_sent", recorder.challenge)
        crashed = failure is not None and not isinstance(failure, _DISCONNECTS)
        if status >= 500 or not completed:
            span.set_status(Status(StatusCode.ERROR))
            if crashed:
                error = type(failure).__name__
            elif not completed:
                error = "connection_closed"
            else:
                error = noted.get("error.type") or str(status)  # the route's own code says more
            span.set_attribute("error.type", error)
        REQUESTS.labels(template or "unmatched", scope["method"], str(status)).inc()
        if download:
            self._log_download(scope, template or "unmatched", status, recorder.bytes, seconds, completed,
                               type(failure).__name__ if crashed else None)

    @staticmethod
    def _log_download(scope: Scope, template: str, status: int, sent: int, seconds: float, completed: bool,
                      crash: str | None) -> None:
        info = scope["state"].get("download") or {}
        if 200 <= status < 300:  # archive bytes; not the JSON of an error
            BYTES_SERVED.labels(template).inc(sent)
        if "cache_hit" in info and status < 300:
            CACHE.labels("hit" if info["cache_hit"] else "miss").inc()
        fields = {
            "event": "download", "method": scope["method"], "path": scope["path"], "image": info.get("image"),
            "platform": info.get("platform"), "digest": info.get("digest"), "status": status, "bytes": sent, "duration_s": round(seconds, 3),
            "cache_hit": info.get("cache_hit"), "complete": completed, "trace_id": current_trace_id(),
            "error": info.get("error") or crash,
        }
        note = "" if completed else f" (failed: {crash})" if crash else " (connection closed early)"
        log.info("%s %s %s image=%s platform=%s digest=%s bytes=%d duration=%.3fs cache_hit=%s trace_id=%s%s",
                 scope["method"], scope["path"], status, fields["image"], fields["platform"], fields["digest"], sent,
                 seconds,
                 fields["cache_hit"], fields["trace_id"], note, extra={"fields": fields})


async def metrics(request: Request) -> Response:
    state = request.app.state
    settings = state.settings
    if settings.two_tier:
        try:
            QUEUE_DEPTH.set(await state.preparer.queue_depth())
        except Exception:  # Redis down: leave the last value, /health says why
            pass
    STORE_BYTES.set(state.store.layer_bytes())
    return Response(exposition(), media_type=CONTENT_TYPE_LATEST)
