"""The API's own refusals (no such route, wrong method, a bug) in the one documented JSON shape.

Starlette answers these in plain text by default and redirects a trailing slash with 307; a switch follows no
redirect and a script cannot parse "Not Found". So: no redirects (a trailing slash is a 404 that names the path
without it), and a 500 says only that it was logged — the traceback goes to the log, never to the client.
"""

from __future__ import annotations

import http

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match

from docker_http_passthrough.shared.errors import PassthroughError

# Paths are the client's: echo enough to recognise one, not a megabyte of it.
ECHO_LIMIT = 200


def json_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(PassthroughError(message, status=status, code=code).to_dict(), status_code=status,
                        headers=headers)


def _shown(path: str) -> str:
    return path if len(path) <= ECHO_LIMIT else path[:ECHO_LIMIT] + "…"


def _route_exists(request: Request, path: str) -> bool:
    scope = {**request.scope, "path": path, "root_path": ""}
    return any(route.matches(scope)[0] != Match.NONE for route in request.app.router.routes)


def _not_found_message(request: Request) -> str:
    path = request.url.path
    trimmed = path.rstrip("/")
    if trimmed and trimmed != path and _route_exists(request, trimmed):
        return f"no route for {_shown(path)}; paths never end in a slash: {_shown(trimmed)}"
    return f"no route for {_shown(path)} (see the README for the routes)"


async def http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    if status == 404:
        code, message = "not_found", _not_found_message(request)
    elif status == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        code = "method_not_allowed"
        message = f"{request.method[:20]} is not allowed on {_shown(request.url.path)}; allowed: {allowed}"
    else:
        phrase = http.HTTPStatus(status).phrase if status in http.HTTPStatus._value2member_map_ else "error"
        code, message = phrase.lower().replace(" ", "_").replace("-", "_"), str(exc.detail)
    return json_error(status, code, message, headers=exc.headers)


async def unexpected_error(request: Request, exc: Exception) -> Response:
    # Starlette's ServerErrorMiddleware sends this, then re-raises: uvicorn logs the traceback.
    return json_error(500, "internal_error", "the server hit an unexpected error; it is in the server log")


EXCEPTION_HANDLERS = {HTTPException: http_exception, Exception: unexpected_error}
