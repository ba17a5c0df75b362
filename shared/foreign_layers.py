"""Foreign (non-distributable) layers: Windows base layers and other blobs a registry may not serve, fetched from
the URLs their descriptor lists, when `ALLOW_FOREIGN_LAYERS` allows it.

A manifest is the registry's word, and a hostile registry could list any URL (a cloud metadata address, a host
inside the network). So a URL is used only when its host is allowed (`Settings.foreign_layer_hosts`: a list of
hosts, or "*" for any) — at every redirect too — and it goes through the process's guarded HTTP client, which
checks every connection against REGISTRY_ALLOWED_HOSTS after DNS (see upstream_http) as for a registry a client
names. No credentials are ever sent to these URLs, and the bytes are
verified against the descriptor's digest (and the config's diff_id) like any registry blob.
"""

from __future__ import annotations

from urllib.parse import urljoin, urlsplit

import httpx

from docker_http_passthrough.shared import manifest as mf
from docker_http_passthrough.shared.errors import NotAllowed, PassthroughError, Unsupported
from docker_http_passthrough.shared.metrics import UPSTREAM

MAX_REDIRECTS = 5
SETTING = "ALLOW_FOREIGN_LAYERS"


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """`allowed` holds host names, ".suffix" entries (any subdomain) or "*"."""
    host = host.lower().rstrip(".")
    return any(entry == "*" or host == entry or (entry.startswith(".") and host.endswith(entry))
               for entry in allowed)


def url_problem(url: str, allowed: tuple[str, ...]) -> str | None:
    """Why this URL may not be fetched, or None."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a port that is not a number
    except ValueError:
        return "not a URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "not an http(s) URL"
    if parts.username or parts.password:
        return "carries credentials"
    if not host_allowed(parts.hostname, allowed):
        return f"its host {parts.hostname} is not allowed by {SETTING}"
    return None


async def _open(http: httpx.AsyncClient, url: str, allowed: tuple[str, ...]) -> httpx.Response | str:
    """An open 200 response for `url`, following redirects only to allowed hosts; else why not."""
    for _hop in range(MAX_REDIRECTS + 1):
        problem = url_problem(url, allowed)
        if problem:
            return problem
        try:
            # A fresh request: no Authorization header, whatever the registry's credentials are.
            response = await http.send(http.build_request("GET", url), stream=True, follow_redirects=False)
        except httpx.HTTPError as exc:
            UPSTREAM.labels("foreign_blob_get", "error").inc()
            return f"unreachable ({type(exc).__name__})"
        except NotAllowed as exc:  # the guarded client's address check (REGISTRY_ALLOWED_HOSTS)
            return exc.message
        UPSTREAM.labels("foreign_blob_get", str(response.status_code)).inc()
        if response.is_redirect and "location" in response.headers:
            await response.aclose()
            url = urljoin(url, response.headers["location"])
            continue
        if response.status_code == 200:
            return response
        await response.aclose()
        return f"HTTP {response.status_code}"
    return f"more than {MAX_REDIRECTS} redirects"


async def open_foreign(http: httpx.AsyncClient, layer: mf.Descriptor,
                       allowed: tuple[str, ...]) -> tuple[httpx.Response | None, list[str]]:
    """The first of the layer's URLs that answers (in the descriptor's order), and what went wrong with the
    others. (None, []) when the layer lists no URLs or none may be used at all (the setting is off)."""
    if not layer.urls or not allowed:
        return None, []
    problems = []
    for url in layer.urls:
        opened = await _open(http, url, allowed)
        if isinstance(opened, httpx.Response):
            return opened, problems
        problems.append(f"{_shown(url)}: {opened}")
    return None, problems


def _shown(url: str) -> str:
    """A URL as it may appear in messages and logs: without userinfo or query (they might carry tokens)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{':' + str(parts.port) if parts.port else ''}{parts.path}"


def foreign_layer_error(layer: mf.Descriptor, allowed: tuple[str, ...], problems: list[str]) -> PassthroughError:
    """The registry does not serve this layer, and its URLs could not (or may not) be used."""
    where = ", ".join(_shown(url) for url in layer.urls) or "none"
    if not allowed:
        advice = (f"this server does not fetch foreign layers (set {SETTING}=true, or to the hosts allowed, e.g. "
                  f"{SETTING}={urlsplit(layer.urls[0]).hostname or 'mcr.microsoft.com'})" if layer.urls
                  else "and its descriptor lists no URLs to fetch it from")
    else:
        advice = "none of its URLs gave it: " + "; ".join(problems) if problems else "it lists no URLs"
    return Unsupported(f"layer {layer.digest} ({layer.media_type}) is a foreign (non-distributable) layer that the "
                       f"registry does not serve; its URLs: {where}; {advice}", code="foreign_layer")
