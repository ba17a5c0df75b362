"""Settings from the environment, with the names and defaults of the Rust tool this project replaces.

Both tiers read the same variables; a bad value stops start-up with a message naming the variable.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import urlsplit

from docker_http_passthrough.shared.platforms import PlatformError, parse_platform

CLIENT_AUTH_MODES = ("optional", "required", "off")
DOCKER_HUB_API = "https://registry-1.docker.io"


class SettingsError(ValueError):
    """A setting with a value that cannot work; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    registry_url: str = DOCKER_HUB_API
    registry_name: str = ""
    # None: not set (discover from the registry's challenge); "": explicitly no token endpoint.
    registry_auth_url: str | None = None
    registry_service: str | None = None
    registry_username: str | None = None
    registry_password: str | None = None
    registry_bearer_token: str | None = None
    registry_client_auth: str = "optional"
    registry_default_namespace: str | None = None
    redis_url: str | None = None
    cache_dir: str = "./cache"
    queue_name: str = "docker-http-passthrough"
    # Key shared by both tiers to encrypt client credentials while a job needs them.
    credentials_key: str | None = None
    platform: str = "linux/amd64"
    job_timeout: int = 4 * 3600
    # How long a request waits for its preparation job before answering 504.
    prepare_timeout: float = 3600.0
    # A worker whose heartbeat is older than this is dead: its job runs again on a live worker, its leftovers are
    # removed; with no live worker for this long, a waiting request gets 504.
    worker_lost_timeout: float = 15.0
    # Redis calls retry (with backoff) for about this long before a request gets 503; shorter blips cost time only.
    redis_outage_timeout: float = 10.0
    upstream_timeout: float = 30.0
    layer_concurrency: int = 3
    # Remember a failed resolution (404, refused credentials) this long; 0 turns it off.
    error_cache_seconds: float = 10.0
    # Serve a previously prepared tag when the registry is unreachable (with an X-Served-Stale header).
    serve_stale: bool = True
    # A cold GET waits this long for its preparation, then streams it as it is prepared (exact Content-Length);
    # 0: never, the response waits for the whole preparation.
    prepare_grace: float = 1.0
    worker_metrics_port: int = 9101  # 0: off
    log_json: bool = False
    # Evict least-recently-used layers when the store grows past this; 0 means unbounded.
    cache_max_bytes: int = 0
    # Serving limits, per API process (see "Limits and timeouts" in the README).
    # A connection must deliver a whole request line and headers within this many seconds of starting one.
    header_timeout: float = 10.0
    # An idle keep-alive connection (between requests) is closed after this long.
    idle_timeout: float = 10.0
    # A response the client has read nothing of for this long is cut (it stopped reading or vanished).
    send_timeout: float = 60.0
    # Open connections; None: derived from the file-descriptor limit at start-up.
    max_connections: int | None = None
    # Download-route requests in progress per client address; 0: no limit. High: a NATed site is one address.
    max_downloads_per_client: int = 1000
    # Distinct images this process has started preparing and that are not done yet; 0: no limit.
    max_cold_images: int = 32
    # API processes serving requests (`serve --workers`); None: one per usable CPU (affinity and cgroup quota).
    api_workers: int | None = None
    # Send layer bytes from the page cache with sendfile (zero-copy); false: read them and write them.
    zero_copy: bool = True
    # Hosts that foreign (non-distributable) layers may be fetched from, by their descriptor's URLs: () = none,
    # ("*",) = any host (the outbound policy still applies); ".example.com" allows its subdomains.
    foreign_layer_hosts: tuple[str, ...] = ()
    # --- the HTTP transport to registries (shared/upstream_http.py, shared/registry.py)
    upstream_retries: int = 3  # further attempts after a failed one (connection errors, 408, 429, 5xx, cuts)
    upstream_retry_after_max: float = 30.0  # a longer Retry-After is not waited for: the transfer fails at once
    upstream_deadline: float = 60.0  # one transfer (token, manifest, config), retries and resumes included…
    upstream_min_rate: int = 100 << 10  # …plus, for a layer blob, its size at this many bytes per second
    resolve_timeout: float = 20.0  # a download's tag resolution, retries included (devices wait 30 s for headers)
    upstream_max_redirects: int = 5
    manifest_max_bytes: int = 4 << 20  # manifests and indexes (CNCF distribution refuses larger pushes)
    config_max_bytes: int = 8 << 20
    image_max_layers: int = 128  # Docker's overlay2 cannot run more than 125-128 layers
    image_max_bytes: int = 32 << 30  # compressed (from the manifest) and unpacked (as it inflates)
    # Hosts clients may name in /registry/... URLs (address_policy); REGISTRY_URL and REGISTRY_MIRROR are trusted.
    registry_allowed_hosts: str = "public,private"
    registry_ca_bundle: str | None = None  # extra CAs for every registry
    registry_ca_bundles: str | None = None  # host[:port]=path,… extra CAs for one registry
    registry_insecure_hosts: str | None = None  # host[:port],… whose TLS certificates are not verified
    registry_mirror: str | None = None  # pull-through mirror asked first for Docker Hub pulls
    # Outbound proxies, as curl and httpx read them (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, NO_PROXY).
    https_proxy: str | None = None
    http_proxy: str | None = None
    no_proxy: str | None = None

    @property
    def two_tier(self) -> bool:
        return bool(self.redis_url)


def _optional(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    return value if value else None


def _number(env: Mapping[str, str], name: str, default: float, *, kind: type = float, zero_ok: bool = False) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a {'number' if kind is float else 'whole number'}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise SettingsError(f"{name}={raw!r} must be a finite number {'>= 0' if zero_ok else '> 0'}")
    return value


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) > 65535:
        raise SettingsError(f"{name}={raw!r} must be a port number (0 turns it off)")
    return int(raw)


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={env.get(name)!r} must be true or false")


def _byte_size(env: Mapping[str, str], name: str, default: int = 0, *, zero_ok: bool = True) -> int:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number, unit = raw.rstrip("iBb").upper()[:-1], raw.rstrip("iBb").upper()[-1:]
    if unit.isdigit():
        number, unit = number + unit, ""
    try:
        value = int(float(number) * units[unit])
    except (ValueError, KeyError, OverflowError):
        raise SettingsError(f"{name}={raw!r} is not a size (bytes, or with K/M/G/T, e.g. 50G)") from None
    if value < 0 or (value == 0 and not zero_ok):
        raise SettingsError(f"{name}={raw!r} must be {'>= 0' if zero_ok else '> 0'}")
    return value


_HOST_NAME_RE = re.compile(r"\.?[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")


def _foreign_layer_hosts(env: Mapping[str, str]) -> tuple[str, ...]:
    raw = (env.get("ALLOW_FOREIGN_LAYERS") or "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return ()
    if raw in ("1", "true", "yes", "on", "*"):
        return ("*",)
    hosts = tuple(host.strip() for host in raw.split(",") if host.strip())
    for host in hosts:
        if not _HOST_NAME_RE.fullmatch(host):
            raise SettingsError(f"ALLOW_FOREIGN_LAYERS: {host!r} is not a host name (true, false, or a comma-separated "
                                "list of hosts such as mcr.microsoft.com,.blob.core.windows.net)")
    return hosts


def _http_url(name: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(f"{name}={value!r} must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise SettingsError(f"{name} must not carry credentials in the URL; use REGISTRY_USERNAME/REGISTRY_PASSWORD")
    return value.rstrip("/")


def _proxy_url(env: Mapping[str, str], *names: str) -> str | None:
    """The first of `names` set (upper- then lowercase, as curl and httpx read them); checked, never echoed."""
    for name in names:
        for variant in (name, name.lower()):
            value = (env.get(variant) or "").strip()
            if not value:
                continue
            url = value if "://" in value else f"http://{value}"
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise SettingsError(f"{variant} must be an http:// or https:// proxy URL (SOCKS is not supported)")
            return url
    return None


def _checked(name: str, raw: str | None, check) -> str | None:
    """`raw` if `check(raw)` accepts it; SettingsError naming the variable otherwise."""
    if raw:
        try:
            check(raw)
        except ValueError as exc:
            raise SettingsError(f"{name}: {exc}") from None
    return raw


def _upstream(env: Mapping[str, str]) -> dict:
    """The settings of the HTTP transport to registries."""
    from docker_http_passthrough.shared.address_policy import parse_allowed_hosts
    from docker_http_passthrough.shared.host_patterns import parse_host_list
    from docker_http_passthrough.shared.tls_trust import check_ca_file, parse_ca_bundles

    def ca_files(raw: str) -> None:
        for _pattern, path in parse_ca_bundles(raw):
            check_ca_file(path)

    mirror = env.get("REGISTRY_MIRROR") or None
    if mirror:
        mirror = _http_url("REGISTRY_MIRROR", mirror)
        if urlsplit(mirror).path:
            raise SettingsError(f"REGISTRY_MIRROR={mirror!r} must be scheme://host[:port], without a path")
    return dict(
        upstream_retries=int(_number(env, "UPSTREAM_RETRIES", 3, kind=int, zero_ok=True)),
        upstream_retry_after_max=_number(env, "UPSTREAM_RETRY_AFTER_MAX", 30.0, zero_ok=True),
        upstream_deadline=_number(env, "UPSTREAM_DEADLINE", 60.0),
        upstream_min_rate=_byte_size(env, "UPSTREAM_MIN_RATE", 100 << 10, zero_ok=False),
        resolve_timeout=_number(env, "RESOLVE_TIMEOUT", 20.0),
        upstream_max_redirects=int(_number(env, "UPSTREAM_MAX_REDIRECTS", 5, kind=int, zero_ok=True)),
        manifest_max_bytes=_byte_size(env, "MANIFEST_MAX_BYTES", 4 << 20, zero_ok=False),
        config_max_bytes=_byte_size(env, "CONFIG_MAX_BYTES", 8 << 20, zero_ok=False),
        image_max_layers=int(_number(env, "IMAGE_MAX_LAYERS", 128, kind=int)),
        image_max_bytes=_byte_size(env, "IMAGE_MAX_BYTES", 32 << 30, zero_ok=False),
        registry_allowed_hosts=_checked("REGISTRY_ALLOWED_HOSTS", (env.get("REGISTRY_ALLOWED_HOSTS") or "").strip(),
                                        parse_allowed_hosts) or "public,private",
        registry_ca_bundle=_checked("REGISTRY_CA_BUNDLE", _optional(env, "REGISTRY_CA_BUNDLE"), check_ca_file),
        registry_ca_bundles=_checked("REGISTRY_CA_BUNDLES", _optional(env, "REGISTRY_CA_BUNDLES"), ca_files),
        registry_insecure_hosts=_checked("REGISTRY_INSECURE_HOSTS", _optional(env, "REGISTRY_INSECURE_HOSTS"),
                                         parse_host_list),
        registry_mirror=mirror,
        https_proxy=_proxy_url(env, "HTTPS_PROXY", "ALL_PROXY"),
        http_proxy=_proxy_url(env, "HTTP_PROXY", "ALL_PROXY"),
        no_proxy=(env.get("NO_PROXY") or env.get("no_proxy") or "").strip() or None,
    )


# Over 60 lines: one reading of every variable, in one place, is easier to check than pieces of it.
def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    redis_url = _optional(env, "REDIS_URL")
    if redis_url and urlsplit(redis_url).scheme not in ("redis", "rediss", "unix"):
        raise SettingsError("REDIS_URL must start with redis://, rediss:// or unix://")

    if (env.get("LOG_FORMAT") or "text").strip().lower() not in ("text", "json"):
        raise SettingsError(f"LOG_FORMAT={env.get('LOG_FORMAT')!r} must be text or json")
    try:
        platform = str(parse_platform(env.get("PLATFORM") or "linux/amd64"))
    except PlatformError as exc:
        raise SettingsError(f"PLATFORM: {exc}") from None

    return Settings(
        **_registry(env),
        redis_url=redis_url,
        cache_dir=env.get("CACHE_DIR") or "./cache",
        queue_name=env.get("QUEUE_NAME") or "docker-http-passthrough",
        credentials_key=_optional(env, "CREDENTIALS_KEY"),
        platform=platform,
        job_timeout=int(_number(env, "JOB_TIMEOUT", 4 * 3600, kind=int)),
        prepare_timeout=_number(env, "PREPARE_TIMEOUT", 3600.0),
        worker_lost_timeout=_number(env, "WORKER_LOST_TIMEOUT", 15.0),
        redis_outage_timeout=_number(env, "REDIS_OUTAGE_TIMEOUT", 10.0),
        upstream_timeout=_number(env, "UPSTREAM_TIMEOUT", 30.0),
        layer_concurrency=int(_number(env, "LAYER_CONCURRENCY", 3, kind=int)),
        error_cache_seconds=_number(env, "ERROR_CACHE_SECONDS", 10.0, zero_ok=True),
        serve_stale=_flag(env, "SERVE_STALE", True),
        prepare_grace=_number(env, "PREPARE_GRACE", 1.0, zero_ok=True),
        worker_metrics_port=_port(env, "WORKER_METRICS_PORT", 9101),
        log_json=(env.get("LOG_FORMAT") or "text").strip().lower() == "json",
        cache_max_bytes=_byte_size(env, "CACHE_MAX_BYTES"),
        **_serving(env),
        foreign_layer_hosts=_foreign_layer_hosts(env),
        **_upstream(env),
    )


def _registry(env: Mapping[str, str]) -> dict:
    """The configured registry and how to authenticate to it (REGISTRY_*)."""
    auth_url = env.get("REGISTRY_AUTH_URL")
    if auth_url:
        auth_url = _http_url("REGISTRY_AUTH_URL", auth_url)

    client_auth = (env.get("REGISTRY_CLIENT_AUTH") or "optional").strip().lower()
    if client_auth not in CLIENT_AUTH_MODES:
        raise SettingsError(
            f"REGISTRY_CLIENT_AUTH={env.get('REGISTRY_CLIENT_AUTH')!r} must be one of {', '.join(CLIENT_AUTH_MODES)}"
        )

    username = _optional(env, "REGISTRY_USERNAME")
    password = _optional(env, "REGISTRY_PASSWORD")
    if bool(username) != bool(password):
        raise SettingsError("REGISTRY_USERNAME and REGISTRY_PASSWORD must be set together")

    namespace = _optional(env, "REGISTRY_DEFAULT_NAMESPACE")
    if namespace is not None:
        from docker_http_passthrough.shared.name import parse_filename

        try:
            parse_filename("x_latest.tar", docker_hub=False, default_namespace=namespace)
        except ValueError:
            raise SettingsError(f"REGISTRY_DEFAULT_NAMESPACE={namespace!r} is not a valid repository path") from None

    return dict(
        registry_url=_http_url("REGISTRY_URL", env.get("REGISTRY_URL") or DOCKER_HUB_API),
        registry_name=env.get("REGISTRY_NAME") or "",
        registry_auth_url=auth_url if "REGISTRY_AUTH_URL" in env else None,
        registry_service=_optional(env, "REGISTRY_SERVICE"),
        registry_username=username,
        registry_password=password,
        registry_bearer_token=_optional(env, "REGISTRY_BEARER_TOKEN") or _optional(env, "REGISTRY_TOKEN"),
        registry_client_auth=client_auth,
        registry_default_namespace=namespace,
    )


def _serving(env: Mapping[str, str]) -> dict:
    """How the API serves its clients: timeouts, limits, processes."""
    return dict(
        header_timeout=_number(env, "HEADER_TIMEOUT", 10.0),
        idle_timeout=_number(env, "IDLE_TIMEOUT", 10.0),
        send_timeout=_number(env, "SEND_TIMEOUT", 60.0),
        max_connections=int(_number(env, "MAX_CONNECTIONS", 0, kind=int, zero_ok=True)) or None,
        max_downloads_per_client=int(_number(env, "MAX_DOWNLOADS_PER_CLIENT", 1000, kind=int, zero_ok=True)),
        max_cold_images=int(_number(env, "MAX_COLD_IMAGES", 32, kind=int, zero_ok=True)),
        api_workers=_api_workers(env),
        zero_copy=_flag(env, "ZERO_COPY", True),
    )


def _api_workers(env: Mapping[str, str]) -> int | None:
    """API_WORKERS, or WEB_CONCURRENCY as platforms (and uvicorn, gunicorn) name it; unset: decided at start."""
    name = "API_WORKERS" if env.get("API_WORKERS") else "WEB_CONCURRENCY"
    return int(_number(env, name, 0, kind=int)) or None
