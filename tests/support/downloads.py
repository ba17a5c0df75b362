"""Client-side helpers for end-to-end tests: download like a switch or curl would, and look inside the tar."""

from __future__ import annotations

import io
import json
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx


@dataclass
class Download:
    status: int
    headers: httpx.Headers
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def filename_for(repository: str, tag: str) -> str:
    """The download filename a switch asks for: ``team/app``, ``v1`` -> ``team__app_v1.tar``."""
    return repository.replace("/", "__") + f"_{tag}.tar"


def image_url(server_url: str, registry_host: str, repository: str, tag: str, *, route: str = "registry") -> str:
    """``repository:tag`` at the registry ``registry_host`` (plain http), through the server at ``server_url``
    (``""`` for a path)."""
    return f"{server_url}/{route}/http/{registry_host}/docker/{filename_for(repository, tag)}"


def get(url: str, *, auth: tuple[str, str] | None = None, timeout: float = 120.0, method: str = "GET") -> Download:
    with httpx.Client(timeout=timeout, trust_env=False) as client:
        response = client.request(method, url, auth=auth)
        return Download(response.status_code, response.headers, response.content)


def get_many(urls: list[str], *, auth: tuple[str, str] | None = None) -> list[Download]:
    """All at once, each on its own connection, as a fleet of devices would."""
    with ThreadPoolExecutor(max_workers=len(urls)) as pool:
        return list(pool.map(lambda u: get(u, auth=auth), urls))


def tar_members(data: bytes) -> dict[str, bytes | None]:
    """Name → content (None for directories), in archive order."""
    out: dict[str, bytes | None] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar.getmembers():
            assert member.isfile() or member.isdir(), f"{member.name} is neither a file nor a directory"
            out[member.name] = tar.extractfile(member).read() if member.isfile() else None
    return out


def archive_manifest(data: bytes) -> list[dict]:
    return json.loads(tar_members(data)["manifest.json"])


def archive_config(data: bytes) -> dict:
    members = tar_members(data)
    return json.loads(members[archive_manifest(data)[0]["Config"]])
