"""Per-request telemetry: one server span per request (never one per ASGI message), metrics, and one log
line per download, written when its last byte has gone out (or the connection broke)."""

from __future__ import annotations

import logging
import time

from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.metrics import BYTES_SERVED, CACHE, QUEUE_DEPTH, REQUESTS, STORE_BYTES
from shared.telemetry import current_trace_id, tracer

log = logging.getLogger("docker_http_passthrough.access")

DOWNLOAD_PREFIXES = ("/docker/", "/registry/", "/registry-auth/")


def _route_template(scope: Scope) -> str | None:
    for route in getattr(scope.get("app"), "routes", ()):
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return route.path
    return None


class TelemetryMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        template = _route_template(scope) or "unmatched"
        method = scope["method"]
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
        server = scope.get("server") or ("", 0)
        client = scope.get("client") or ("", 0)
        attributes = {
            "http.request.method": method, "http.route": template, "url.path": scope["path"],
            "url.scheme": scope.get("scheme", "http"), "server.address": server[0] or "", "server.port": server[1] or 0,
            "client.address": client[0] or "", "network.peer.address": client[0] or "",
            "network.peer.port": client[1] or 0, "network.protocol.name": "http",
            "network.protocol.version": scope.get("http_version", "1.1"), "network.transport": "tcp",
            "user_agent.original": headers.get("user-agent", ""),
        }
        started = time.monotonic()
        result = {"status": 500, "bytes": 0}
        scope.setdefault("state", {})

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                result["status"] = message["status"]
            elif message["type"] == "http.response.body":
                result["bytes"] += len(message.get("body", b""))
            await send(message)

        with tracer().start_as_current_span(f"{method} {template}", kind=SpanKind.SERVER,
                                            attributes=attributes) as span:
            completed = False
            try:
                await self.app(scope, receive, counting_send)
                completed = True
            finally:
                status = result["status"]
                span.set_attribute("http.response.status_code", status)
                span.set_attribute("http.response.body.size", result["bytes"])
                for name, value in (scope["state"].get("span_attributes") or {}).items():
                    span.set_attribute(name, value)
                if status >= 500 or not completed:
                    span.set_status(Status(StatusCode.ERROR))
                    span.set_attribute("error.type", str(status) if completed else "connection_closed")
                REQUESTS.labels(template, method, str(status)).inc()
                if scope["path"].startswith(DOWNLOAD_PREFIXES):
                    self._log_download(scope, template, status, result["bytes"], time.monotonic() - started,
                                       completed)

    @staticmethod
    def _log_download(scope: Scope, template: str, status: int, sent: int, seconds: float, completed: bool) -> None:
        info = scope["state"].get("download") or {}
        BYTES_SERVED.labels(template).inc(sent)
        if "cache_hit" in info and status < 300:
            CACHE.labels("hit" if info["cache_hit"] else "miss").inc()
        fields = {
            "event": "download", "method": scope["method"], "path": scope["path"], "image": info.get("image"),
            "digest": info.get("digest"), "status": status, "bytes": sent, "duration_s": round(seconds, 3),
            "cache_hit": info.get("cache_hit"), "complete": completed, "trace_id": current_trace_id(),
            "error": info.get("error"),
        }
        log.info("%s %s %s image=%s digest=%s bytes=%d duration=%.3fs cache_hit=%s trace_id=%s%s",
                 scope["method"], scope["path"], status, fields["image"], fields["digest"], sent, seconds,
                 fields["cache_hit"], fields["trace_id"], "" if completed else " (connection closed early)",
                 extra={"fields": fields})


async def metrics(request: Request) -> Response:
    state = request.app.state
    settings = state.settings
    if settings.two_tier:
        try:
            QUEUE_DEPTH.set(await state.preparer.redis.llen(f"rq:queue:{settings.queue_name}"))
        except Exception:  # Redis down: leave the last value, /health says why
            pass
    STORE_BYTES.set(state.store.layer_bytes())
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
