"""The page at `/` (docs/index.html: route builder, IOS-XE commands, pre-warm) and `/info`, what it asks of us.

The page is one file with one inline style block and one inline script. The Content-Security-Policy allows
exactly those two (by their sha256) and requests to this server only: nothing else runs, nothing is fetched
from elsewhere, and the page can be framed by nobody.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

# Source tree: <repo>/api/page.py → <repo>/docs/index.html. Installed: docker_http_passthrough/api/page.py →
# docker_http_passthrough/docs/index.html (package data, see pyproject.toml).
PAGE_PATH = Path(__file__).resolve().parents[1] / "docs" / "index.html"
_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


@dataclass(frozen=True)
class Page:
    body: bytes
    headers: dict[str, str]


def _hash_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def content_security_policy(html: str) -> str:
    """script-src and style-src list the hashes of the page's own inline blocks, and nothing else."""
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for kind, text in _INLINE.findall(html):
        hashes[kind].append(_hash_source(text))
    return "; ".join([
        "default-src 'none'",
        "script-src " + (" ".join(hashes["script"]) or "'none'"),
        "style-src " + (" ".join(hashes["style"]) or "'none'"),
        "connect-src 'self'",
        "img-src data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ])


@functools.lru_cache(maxsize=1)
def load_page(path: Path = PAGE_PATH) -> Page:
    body = path.read_bytes()
    return Page(body, {
        "Content-Type": "text/html; charset=utf-8",
        "Content-Security-Policy": content_security_policy(body.decode()),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
        "ETag": '"' + hashlib.sha256(body).hexdigest()[:32] + '"',
    })


async def index(request: Request) -> Response:
    page = load_page()
    if request.headers.get("if-none-match") == page.headers["ETag"]:
        return Response(status_code=304, headers={k: v for k, v in page.headers.items() if k != "Content-Type"})
    body = b"" if request.method == "HEAD" else page.body
    return Response(body, headers={**page.headers, "Content-Length": str(len(page.body))})


async def info(request: Request) -> JSONResponse:
    """What the page needs to build URLs for this server: its registry and how it names images. No secrets,
    nothing about what anyone downloaded."""
    settings = request.app.state.settings
    target = request.app.state.default_target
    return JSONResponse({
        "registry": target.name,
        "registry_host": urlsplit(target.api_url).netloc.lower(),
        "docker_hub": target.is_docker_hub,
        "default_namespace": settings.registry_default_namespace,
        "platform": settings.platform,
        "client_auth": settings.registry_client_auth,
        "mode": "two-tier" if settings.two_tier else "embedded",
    }, headers={"Cache-Control": "no-store"})
