"""Unit tests for shared.settings.load_settings: defaults, every variable, and refusals naming the variable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from docker_http_passthrough.shared.settings import Settings, SettingsError, load_settings

from tests.support.tls import TestCA


README = Path(__file__).resolve().parents[1] / "README.md"
# README's "default" column, where it names no literal value, in the words it uses for what Settings holds.
_WORDS = {"—": None, "discovered": None, "unbounded": 0, "host of `REGISTRY_URL`": "", "from the fd limit": None,
          "one per usable CPU": None}


def _documented_defaults() -> dict[str, str]:
    """Variable -> default, from the table under README's "Settings (environment)"."""
    section = README.read_text().split("## Settings (environment)", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| `")]
    defaults = {}
    for names, default in rows:
        for name in re.findall(r"`([A-Z_]+)`", names.split("(alias")[0]):
            defaults[name] = default.strip()
    return defaults


def _as_documented(value: object) -> object:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value if value is None or isinstance(value, int) and value == 0 else str(value)


def test_empty_environment_gives_the_defaults_the_readme_documents():
    settings = load_settings({})
    checked = []
    for name, documented in _documented_defaults().items():
        field = name.lower()
        if not hasattr(settings, field):
            continue  # read elsewhere (OTEL_*, LOG_*)
        if documented in _WORDS:
            assert _as_documented(getattr(settings, field)) == _WORDS[documented], (name, documented)
        else:  # the documented value, given explicitly, is what an empty environment gives
            given = load_settings({name: documented.strip("`")})
            assert getattr(given, field) == getattr(settings, field), (name, documented, getattr(settings, field))
        checked.append(name)
    assert len(checked) >= 20, checked  # the table was found and read


def test_empty_values_mean_defaults():
    env = {name: "" for name in ("REGISTRY_URL", "REGISTRY_NAME", "REGISTRY_SERVICE", "REGISTRY_USERNAME",
                                 "REGISTRY_PASSWORD", "REGISTRY_BEARER_TOKEN", "REGISTRY_CLIENT_AUTH",
                                 "REGISTRY_DEFAULT_NAMESPACE", "REDIS_URL", "CACHE_DIR", "QUEUE_NAME",
                                 "CREDENTIALS_KEY", "PLATFORM", "PREPARE_TIMEOUT", "WORKER_LOST_TIMEOUT",
                                 "JOB_TIMEOUT", "UPSTREAM_TIMEOUT", "LAYER_CONCURRENCY")}
    assert load_settings(env) == Settings()


def test_every_variable_is_parsed():
    s = load_settings({
        "REGISTRY_URL": "http://registry.internal:5000/",
        "REGISTRY_NAME": "registry.corp.example",
        "REGISTRY_AUTH_URL": "https://auth.internal/token",
        "REGISTRY_SERVICE": "internal-registry",
        "REGISTRY_USERNAME": "svc",
        "REGISTRY_PASSWORD": "svc-password",
        "REGISTRY_BEARER_TOKEN": "static-token",
        "REGISTRY_CLIENT_AUTH": " Required ",
        "REGISTRY_DEFAULT_NAMESPACE": "team/base",
        "REDIS_URL": "redis://redis:6379/0",
        "CACHE_DIR": "/srv/cache",
        "QUEUE_NAME": "q1",
        "CREDENTIALS_KEY": "a long random secret",
        "PLATFORM": "linux/arm64/v8",
        "PREPARE_TIMEOUT": "12.5",
        "WORKER_LOST_TIMEOUT": "7",
        "JOB_TIMEOUT": "99",
        "UPSTREAM_TIMEOUT": "3.5",
        "LAYER_CONCURRENCY": "8",
    })
    assert s.registry_url == "http://registry.internal:5000"
    assert s.registry_name == "registry.corp.example"
    assert s.registry_auth_url == "https://auth.internal/token"
    assert s.registry_service == "internal-registry"
    assert (s.registry_username, s.registry_password) == ("svc", "svc-password")
    assert s.registry_bearer_token == "static-token"
    assert s.registry_client_auth == "required"
    assert s.registry_default_namespace == "team/base"
    assert s.redis_url == "redis://redis:6379/0" and s.two_tier
    assert s.cache_dir == "/srv/cache"
    assert s.queue_name == "q1"
    assert s.credentials_key == "a long random secret"
    assert s.platform == "linux/arm64"  # normalised: v8 is arm64's default variant
    assert s.prepare_timeout == 12.5
    assert s.worker_lost_timeout == 7.0
    assert s.job_timeout == 99 and isinstance(s.job_timeout, int)
    assert s.upstream_timeout == 3.5
    assert s.layer_concurrency == 8 and isinstance(s.layer_concurrency, int)


def test_cache_sizes_and_booleans_are_parsed():
    s = load_settings({"ERROR_CACHE_SECONDS": "0", "SERVE_STALE": "no", "PREPARE_GRACE": "2.5",
                       "CACHE_MAX_BYTES": "50G"})
    assert (s.error_cache_seconds, s.serve_stale, s.prepare_grace, s.cache_max_bytes) == (0.0, False, 2.5, 50 << 30)
    assert load_settings({"SERVE_STALE": "TRUE"}).serve_stale is True
    for raw, expected in (("1024", 1024), ("10MiB", 10 << 20), ("1k", 1 << 10), ("2T", 2 << 40), ("", 0)):
        assert load_settings({"CACHE_MAX_BYTES": raw}).cache_max_bytes == expected, raw


def test_serving_limits():
    defaults = load_settings({})
    assert (defaults.header_timeout, defaults.idle_timeout, defaults.send_timeout) == (10.0, 10.0, 60.0)
    assert defaults.max_connections is None  # derived from the file-descriptor limit at start-up
    assert (defaults.max_downloads_per_client, defaults.max_cold_images) == (1000, 32)
    s = load_settings({"HEADER_TIMEOUT": "2.5", "IDLE_TIMEOUT": "3", "SEND_TIMEOUT": "30", "MAX_CONNECTIONS": "500",
                       "MAX_DOWNLOADS_PER_CLIENT": "0", "MAX_COLD_IMAGES": "4"})
    assert (s.header_timeout, s.idle_timeout, s.send_timeout) == (2.5, 3.0, 30.0)
    assert (s.max_connections, s.max_downloads_per_client, s.max_cold_images) == (500, 0, 4)
    assert load_settings({"MAX_CONNECTIONS": "0"}).max_connections is None


def test_api_processes_and_zero_copy():
    assert (load_settings({}).api_workers, load_settings({}).zero_copy) == (None, True)  # None: one per usable CPU
    assert load_settings({"API_WORKERS": "3"}).api_workers == 3
    assert load_settings({"WEB_CONCURRENCY": "4"}).api_workers == 4  # the name platforms set
    assert load_settings({"WEB_CONCURRENCY": "4", "API_WORKERS": "2"}).api_workers == 2
    assert load_settings({"ZERO_COPY": "false"}).zero_copy is False


def test_upstream_settings_are_parsed(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text(TestCA(tmp_path).cert.read_text())
    s = load_settings({
        "UPSTREAM_RETRIES": "0", "UPSTREAM_RETRY_AFTER_MAX": "5", "UPSTREAM_DEADLINE": "90", "UPSTREAM_MIN_RATE": "1M",
        "RESOLVE_TIMEOUT": "12", "UPSTREAM_MAX_REDIRECTS": "2", "MANIFEST_MAX_BYTES": "1M", "CONFIG_MAX_BYTES": "2M",
        "IMAGE_MAX_LAYERS": "64", "IMAGE_MAX_BYTES": "10G", "REGISTRY_ALLOWED_HOSTS": "private, *.corp.example",
        "REGISTRY_CA_BUNDLE": str(ca), "REGISTRY_CA_BUNDLES": f"harbor.corp.example={ca}, lab:5000={ca}",
        "REGISTRY_INSECURE_HOSTS": "lab:5000 *.lab.example", "REGISTRY_MIRROR": "https://mirror.corp.example/",
        "https_proxy": "proxy.corp.example:3128", "ALL_PROXY": "http://all.corp.example:8080", "no_proxy": "10.0.0.0/8",
    })
    assert (s.upstream_retries, s.upstream_retry_after_max, s.upstream_deadline, s.upstream_min_rate) == (0, 5, 90, 1 << 20)
    assert (s.resolve_timeout, s.upstream_max_redirects, s.manifest_max_bytes, s.config_max_bytes) == (12, 2, 1 << 20, 2 << 20)
    assert (s.image_max_layers, s.image_max_bytes) == (64, 10 << 30)
    assert s.registry_allowed_hosts == "private, *.corp.example" and s.registry_ca_bundle == str(ca)
    assert s.registry_mirror == "https://mirror.corp.example"
    assert s.https_proxy == "http://proxy.corp.example:3128"  # a bare host:port means http://
    assert s.http_proxy == "http://all.corp.example:8080" and s.no_proxy == "10.0.0.0/8"


@pytest.mark.parametrize("mode", ["optional", "required", "off", "OFF"])
def test_client_auth_mode_ignores_case(mode):
    assert load_settings({"REGISTRY_CLIENT_AUTH": mode}).registry_client_auth == mode.lower()


@pytest.mark.parametrize("url", ["redis://localhost:6379/0", "rediss://h:6380", "unix:///run/redis.sock"])
def test_redis_tcp_tls_and_unix_urls_are_accepted(url):
    assert load_settings({"REDIS_URL": url}).redis_url == url


def test_registry_token_is_an_alias_that_the_main_name_overrides():
    assert load_settings({"REGISTRY_TOKEN": "alias-token"}).registry_bearer_token == "alias-token"
    both = load_settings({"REGISTRY_TOKEN": "alias-token", "REGISTRY_BEARER_TOKEN": "main-token"})
    assert both.registry_bearer_token == "main-token"


def test_registry_auth_url_unset_means_discover_and_empty_means_none():
    assert load_settings({}).registry_auth_url is None
    assert load_settings({"REGISTRY_AUTH_URL": ""}).registry_auth_url == ""
    assert load_settings({"REGISTRY_AUTH_URL": "https://a.example/token/"}).registry_auth_url == "https://a.example/token"


@pytest.mark.parametrize("env, variable", [
    ({"REGISTRY_CLIENT_AUTH": "maybe"}, "REGISTRY_CLIENT_AUTH"),
    ({"REGISTRY_URL": "ftp://x"}, "REGISTRY_URL"),
    ({"REGISTRY_URL": "registry.example.com"}, "REGISTRY_URL"),
    ({"REGISTRY_URL": "https://"}, "REGISTRY_URL"),
    ({"REGISTRY_AUTH_URL": "ftp://auth.example/token"}, "REGISTRY_AUTH_URL"),
    ({"REGISTRY_USERNAME": "only-me"}, "REGISTRY_USERNAME"),
    ({"REGISTRY_PASSWORD": "only-pw"}, "REGISTRY_PASSWORD"),
    ({"PREPARE_TIMEOUT": "-1"}, "PREPARE_TIMEOUT"),
    ({"PREPARE_TIMEOUT": "0"}, "PREPARE_TIMEOUT"),
    ({"PREPARE_TIMEOUT": "abc"}, "PREPARE_TIMEOUT"),
    ({"PREPARE_TIMEOUT": "nan"}, "PREPARE_TIMEOUT"),
    ({"WORKER_LOST_TIMEOUT": "-5"}, "WORKER_LOST_TIMEOUT"),
    ({"UPSTREAM_TIMEOUT": "soon"}, "UPSTREAM_TIMEOUT"),
    ({"JOB_TIMEOUT": "1.5"}, "JOB_TIMEOUT"),
    ({"LAYER_CONCURRENCY": "0"}, "LAYER_CONCURRENCY"),
    ({"REDIS_URL": "http://x"}, "REDIS_URL"),
    ({"REGISTRY_DEFAULT_NAMESPACE": "Bad Namespace"}, "REGISTRY_DEFAULT_NAMESPACE"),
    ({"REGISTRY_DEFAULT_NAMESPACE": "UPPER"}, "REGISTRY_DEFAULT_NAMESPACE"),
    ({"REGISTRY_DEFAULT_NAMESPACE": "team//x"}, "REGISTRY_DEFAULT_NAMESPACE"),
    ({"PLATFORM": "amd64"}, "PLATFORM"),
    ({"PLATFORM": "linux/arm64/v8/extra"}, "PLATFORM"),
    ({"PLATFORM": "linux/"}, "PLATFORM"),
    ({"PLATFORM": "/amd64"}, "PLATFORM"),
    ({"ERROR_CACHE_SECONDS": "-1"}, "ERROR_CACHE_SECONDS"),
    ({"PREPARE_GRACE": "later"}, "PREPARE_GRACE"),
    ({"SERVE_STALE": "maybe"}, "SERVE_STALE"),
    ({"CACHE_MAX_BYTES": "lots"}, "CACHE_MAX_BYTES"),
    ({"CACHE_MAX_BYTES": "-5G"}, "CACHE_MAX_BYTES"),
    ({"CACHE_MAX_BYTES": "1e400"}, "CACHE_MAX_BYTES"),
    ({"UPSTREAM_RETRIES": "-1"}, "UPSTREAM_RETRIES"),
    ({"UPSTREAM_DEADLINE": "0"}, "UPSTREAM_DEADLINE"),
    ({"UPSTREAM_MIN_RATE": "0"}, "UPSTREAM_MIN_RATE"),
    ({"MANIFEST_MAX_BYTES": "lots"}, "MANIFEST_MAX_BYTES"),
    ({"IMAGE_MAX_LAYERS": "0"}, "IMAGE_MAX_LAYERS"),
    ({"REGISTRY_ALLOWED_HOSTS": "bad host!"}, "REGISTRY_ALLOWED_HOSTS"),
    ({"REGISTRY_CA_BUNDLE": "/nonexistent/ca.pem"}, "REGISTRY_CA_BUNDLE"),
    ({"REGISTRY_CA_BUNDLES": "harbor.example"}, "REGISTRY_CA_BUNDLES"),
    ({"REGISTRY_INSECURE_HOSTS": "lab:99999"}, "REGISTRY_INSECURE_HOSTS"),
    ({"REGISTRY_MIRROR": "https://mirror.example/v2"}, "REGISTRY_MIRROR"),
    ({"HTTPS_PROXY": "socks5://proxy:1080"}, "HTTPS_PROXY"),
    ({"HEADER_TIMEOUT": "0"}, "HEADER_TIMEOUT"),
    ({"IDLE_TIMEOUT": "-1"}, "IDLE_TIMEOUT"),
    ({"SEND_TIMEOUT": "inf"}, "SEND_TIMEOUT"),
    ({"MAX_CONNECTIONS": "many"}, "MAX_CONNECTIONS"),
    ({"MAX_DOWNLOADS_PER_CLIENT": "-3"}, "MAX_DOWNLOADS_PER_CLIENT"),
    ({"MAX_COLD_IMAGES": "2.5"}, "MAX_COLD_IMAGES"),
    ({"API_WORKERS": "0"}, "API_WORKERS"),
    ({"WEB_CONCURRENCY": "two"}, "WEB_CONCURRENCY"),
    ({"ZERO_COPY": "sometimes"}, "ZERO_COPY"),
], ids=lambda value: "|".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else None)
def test_bad_values_name_the_variable(env, variable):
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    assert variable in str(info.value)
    assert isinstance(info.value, ValueError)


def test_registry_url_with_credentials_is_refused_without_echoing_them():
    with pytest.raises(SettingsError) as info:
        load_settings({"REGISTRY_URL": "https://user:hunter2-url-secret@registry.example.com"})
    assert "REGISTRY_URL" in str(info.value)
    assert "hunter2-url-secret" not in str(info.value)
