"""From an image reference to what a network engineer types: the download URL and the IOS-XE commands.

The page at `/` (docs/index.html) builds the same URL and the same IOS-XE block in JavaScript; the filename
rules themselves are in `shared.name`. tests/test_reference_agreement.py checks that all of them agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from docker_http_passthrough.shared.name import FilenameError, download_path, parse_reference

DESTINATIONS = ("flash:", "usbflash1:", "bootflash:")
APPID_MAX = 32


@dataclass(frozen=True)
class RouteOptions:
    server: str = "http://localhost:8080"
    registry_in_url: bool = False
    client_auth: bool = False  # the switch sends registry credentials
    insecure_registry: bool = False
    destination: str = "flash:"
    default_namespace: str | None = None


def build(text: str, options: RouteOptions) -> dict:
    """{"reference", "registry", "repository", "tag", "url", "problem": {"rule", "message"} | None, "ios"}."""
    result: dict = {"reference": text, "registry": None, "repository": None, "tag": None, "url": None,
                    "problem": None, "ios": None}
    try:
        ref = parse_reference(text)
        result.update(registry=ref.registry, repository=ref.repository, tag=ref.tag or "latest")
        path = download_path(ref, registry_in_url=options.registry_in_url, client_auth=options.client_auth,
                             insecure_registry=options.insecure_registry, default_namespace=options.default_namespace)
    except FilenameError as exc:
        result["problem"] = {"rule": exc.rule, "message": str(exc)}
        return result
    result["url"] = options.server.rstrip("/") + path
    result["ios"] = ios_block(result, options)
    return result


def app_id(repository: str) -> str:
    """An app-hosting appid from the image name: letters, digits and "_", starting with a letter, ≤ 32."""
    name = re.sub(r"[^a-z0-9]+", "_", repository.rsplit("/", 1)[-1].lower())
    name = re.sub(r"^[^a-z]+", "", name)[:APPID_MAX].rstrip("_")
    return name or "app"


def ios_block(result: dict, options: RouteOptions) -> str:
    """The commands for the switch console: credentials (only when the switch sends them), copy, install,
    activate, start, and removing the credentials again right after the copy."""
    filename = result["url"].rsplit("/", 1)[-1]
    target = f"{options.destination}{filename}"
    appid = app_id(result["repository"])
    lines = [f"! {result['registry']}/{result['repository']}:{result['tag']} through docker-http-passthrough"]
    if options.client_auth:
        lines += ["configure terminal", " ip http client username <registry-username>",
                  " ip http client password 0 <registry-password-or-token>", "end"]
    lines.append(f"copy {result['url']} {target}")
    if options.client_auth:
        lines += ["configure terminal", " no ip http client username", " no ip http client password", "end"]
    lines += [f"app-hosting install appid {appid} package {target}", f"app-hosting activate appid {appid}",
              f"app-hosting start appid {appid}"]
    return "\n".join(lines)


def notes(result: dict, options: RouteOptions) -> list[str]:
    """What the user must know about a URL that the URL itself cannot say."""
    out = []
    if result["url"] and not options.registry_in_url:
        out.append(f"/docker/ URLs use the server's own registry (REGISTRY_URL): it must be {result['registry']}, "
                   "else use --registry-in-url")
    if result["url"] and options.client_auth and not options.registry_in_url:
        out.append("the switch's credentials are used when the registry refuses the server's "
                   "(REGISTRY_CLIENT_AUTH=optional, the default, or required)")
    return out
