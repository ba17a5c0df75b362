"""From an image reference to what a network engineer types: the download URL and the IOS-XE commands.

The page at `/` (docs/index.html) builds the same URL and the same IOS-XE block in JavaScript; the filename
rules themselves are in `shared.name`. tests/test_reference_agreement.py checks that all of them agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from docker_http_passthrough.shared.name import FilenameError, download_path, parse_reference, registry_scheme
from docker_http_passthrough.shared.platforms import PlatformError, parse_platform
from docker_http_passthrough.shared.reference import Reference, ref_path

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
    platform: str | None = None  # os/arch[/variant]; None: the server's PLATFORM


SHA256_DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}")
# What a download filename cannot say, and the /ref/ route can.
FILENAME_CANNOT_SAY = frozenset({"tag_underscore", "digest", "component_double_underscore",
                                 "single_component_underscore", "single_component"})


def platform_prefix(platform: str | None) -> str:
    """`/platform/linux/arm64` (normalised) in front of the route, or "" for the server's default."""
    if not platform:
        return ""
    try:
        return parse_platform(platform).path_prefix
    except PlatformError as exc:
        raise FilenameError("invalid_platform", str(exc)) from None


def _ref_route(ref, options: RouteOptions, cannot: FilenameError) -> str:
    """`/ref/<reference>.tar` for what a filename cannot say; `cannot` again when /ref/ cannot reach the registry
    either (it speaks plain HTTP only to loopback registries and the server's own)."""
    if cannot.rule not in FILENAME_CANNOT_SAY:
        raise cannot
    if ref.digest and not SHA256_DIGEST_RE.fullmatch(ref.digest):
        raise FilenameError(cannot.rule, f"{cannot}; and /ref/ pins sha256 digests only (sha256: and 64 lowercase "
                                         "hex digits)")
    if "." in ref.registry.partition("]")[0] and ref.registry.startswith("["):
        raise FilenameError(cannot.rule, f"{cannot}; and /ref/ takes IPv6 registry addresses without dots")
    if options.insecure_registry and registry_scheme(ref.registry) == "https" and not ref.docker_hub:
        raise FilenameError(cannot.rule, f"{cannot}; and /ref/ reaches {ref.registry} over HTTPS only (plain HTTP "
                                         "is for loopback registries and the server's own)")
    return ref_path(Reference(ref.registry, ref.repository, ref.tag, ref.digest), client_auth=options.client_auth)


# Over 40 lines for the result's shape, kept in one place: the page's build() mirrors it field by field.
def build(text: str, options: RouteOptions) -> dict:
    """{"reference", "registry", "repository", "tag", "digest", "platform", "route": "filename" | "ref",
    "filename_problem", "url", "problem": {"rule", "message"} | None, "ios"}."""
    result: dict = {"reference": text, "registry": None, "repository": None, "tag": None, "digest": None,
                    "platform": None, "route": None, "filename_problem": None, "url": None, "problem": None,
                    "ios": None}
    try:
        ref = parse_reference(text)
        result.update(registry=ref.registry, repository=ref.repository,
                      tag=ref.tag or (None if ref.digest else "latest"), digest=ref.digest)
        prefix = platform_prefix(options.platform)
        result["platform"] = prefix.removeprefix("/platform/") or None
        try:
            path = download_path(ref, registry_in_url=options.registry_in_url, client_auth=options.client_auth,
                                 insecure_registry=options.insecure_registry,
                                 default_namespace=options.default_namespace)
            result["route"] = "filename"
        except FilenameError as cannot:
            path = _ref_route(ref, options, cannot)
            result.update(route="ref", filename_problem=cannot.rule)
    except FilenameError as exc:
        result["problem"] = {"rule": exc.rule, "message": str(exc)}
        return result
    result["url"] = options.server.rstrip("/") + prefix + path
    result["ios"] = ios_block(result, options)
    return result


def local_filename(result: dict) -> str:
    """What the tar is called on the switch: the URL's filename, or for /ref/ (whose last segment may hold ":"
    and "@", which IOS-XE file names must not) `<image>_<tag or sha256-12 hex>.tar`, as the server names it."""
    if result["route"] != "ref":
        return result["url"].rsplit("/", 1)[-1]
    tag = result["tag"] or "sha256-" + result["digest"].removeprefix("sha256:")[:12]
    return f"{result['repository'].rsplit('/', 1)[-1]}_{tag}.tar"


def image_line(result: dict) -> str:
    """`registry/repository[:tag][@digest]`, as the IOS-XE block's comment and the prewarm summary name it."""
    return (f"{result['registry']}/{result['repository']}" + (f":{result['tag']}" if result["tag"] else "")
            + (f"@{result['digest']}" if result["digest"] else ""))


def app_id(repository: str) -> str:
    """An app-hosting appid from the image name: letters, digits and "_", starting with a letter, ≤ 32."""
    name = re.sub(r"[^a-z0-9]+", "_", repository.rsplit("/", 1)[-1].lower())
    name = re.sub(r"^[^a-z]+", "", name)[:APPID_MAX].rstrip("_")
    return name or "app"


def ios_block(result: dict, options: RouteOptions) -> str:
    """The commands for the switch console: credentials (only when the switch sends them), copy, install,
    activate, start, and removing the credentials again right after the copy."""
    target = f"{options.destination}{local_filename(result)}"
    appid = app_id(result["repository"])
    lines = [f"! {image_line(result)}{' for ' + result['platform'] if result['platform'] else ''} "
             "through docker-http-passthrough"]
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
    if result["route"] == "ref":
        out.append(f"a download filename cannot say this reference ({result['filename_problem']}): the URL names it "
                   "in full (/ref/), with its registry")
    elif result["url"] and not options.registry_in_url:
        out.append(f"/docker/ URLs use the server's own registry (REGISTRY_URL): it must be {result['registry']}, "
                   "else use --registry-in-url")
    if result["url"] and options.client_auth and not options.registry_in_url:
        out.append("the switch's credentials are used when the registry refuses the server's "
                   "(REGISTRY_CLIENT_AUTH=optional, the default, or required)")
    return out
