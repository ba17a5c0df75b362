"""Generated image references for the agreement test: every registry and path shape, deterministic (seeded).

Each case is an image reference as a user would type it plus the route options, in the two spellings the
implementations use (Python keyword names and the page's JavaScript names).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

REGISTRIES = [
    None, "docker.io", "index.docker.io", "registry-1.docker.io", "DOCKER.IO",
    "ghcr.io", "registry.example.com", "registry.example.com:5000", "Registry.Example.COM:443",
    "localhost", "localhost:5000", "127.0.0.1:5000", "127.20.30.40", "[::1]:5000", "10.20.30.40:8443",
    "my-registry:8080", "harbor.corp.example", "a.b.c.d.example:65535",
]
BAD_REGISTRIES = ["bad_host.example", "host.example:0", "host.example:70000", "[zz]:5000"]
COMPONENTS = [
    "nginx", "app", "my-app", "my_app", "a.b", "team", "platform", "api2", "x--y", "library", "a_b.c-d",
    "z" * 40, "a__b", "Nginx", "", "-bad", "app_", "ümlaut",
]
TAGS = [None, None, "latest", "1.25", "v1.0-rc.1", "2026.06", "LATEST", "a_b", "_x", "-bad", ".bad", "t" * 128,
        "t" * 129, "1.0_beta"]
DIGESTS = [None] * 14 + ["sha256:" + "ab" * 32, "sha512:" + "cd" * 64, "sha256:xyz", "sha256:" + "e" * 31]
NAMESPACES = [None] * 6 + ["myorg", "team/platform"]
DESTINATIONS = ["flash:", "usbflash1:", "bootflash:"]
# Mostly the server's default; some spelled as engineers type them (aliases, default variants), a few broken.
PLATFORMS = [None] * 10 + ["linux/arm64", "linux/aarch64", "linux/arm64/v8", "Linux/AMD64", "linux/arm/v7",
                           "linux/armhf", "linux/arm/6", "windows/amd64", "linux", "linux/x y", "linux/arm64/v8/x"]


@dataclass(frozen=True)
class Case:
    reference: str
    registry_in_url: bool
    client_auth: bool
    insecure_registry: bool
    destination: str
    default_namespace: str | None
    platform: str | None = None
    server: str = "http://10.20.30.40:8080"

    def python_options(self) -> dict:
        return {"server": self.server, "registry_in_url": self.registry_in_url, "client_auth": self.client_auth,
                "insecure_registry": self.insecure_registry, "destination": self.destination,
                "default_namespace": self.default_namespace, "platform": self.platform}

    def js_options(self) -> dict:
        return {"server": self.server, "registryInUrl": self.registry_in_url, "clientAuth": self.client_auth,
                "insecureRegistry": self.insecure_registry, "destination": self.destination,
                "defaultNamespace": self.default_namespace, "platform": self.platform}

    def cli_flags(self) -> tuple[str, ...]:
        flags = ["--server", self.server, "--destination", self.destination]
        flags += ["--registry-in-url"] * self.registry_in_url + ["--auth"] * self.client_auth
        flags += ["--insecure-registry"] * self.insecure_registry
        flags += ["--platform", self.platform] if self.platform else []
        return tuple(flags)


def _reference(rng: random.Random) -> str:
    mostly_valid = rng.random() < 0.7
    registry = rng.choice(REGISTRIES if mostly_valid else REGISTRIES + BAD_REGISTRIES)
    pool = COMPONENTS[:12] if mostly_valid else COMPONENTS
    path = "/".join(rng.choice(pool) for _ in range(rng.choice([1, 1, 2, 2, 2, 3, 4])))
    text = f"{registry}/{path}" if registry else path
    tag = rng.choice(TAGS[:7] if mostly_valid else TAGS)
    text += f":{tag}" if tag is not None else ""
    digest = rng.choice(DIGESTS)
    return text + (f"@{digest}" if digest else "")


FIXED = ["nginx", "nginx:1.25", "ghcr.io/my-org/app:1.0", "registry.example.com:5000/team/platform/api:2026.06",
         "library/nginx", "docker.io/nginx", "index.docker.io/library/nginx:latest", "my_org/app", "localhost/x",
         "x:a_b", "nginx@sha256:" + "ab" * 32, "", "  nginx  ", "Nginx", "a/" * 130 + "b"]


def generate(seed: int = 11, count: int = 320) -> list[Case]:
    rng = random.Random(seed)
    platforms = random.Random(seed + 1)  # its own stream: the other draws stay what they were
    texts = FIXED + [_reference(rng) for _ in range(count - len(FIXED))]
    return [Case(text, registry_in_url=rng.random() < 0.5, client_auth=rng.random() < 0.3,
                 insecure_registry=rng.random() < 0.2, destination=rng.choice(DESTINATIONS),
                 default_namespace=rng.choice(NAMESPACES), platform=platforms.choice(PLATFORMS)) for text in texts]
