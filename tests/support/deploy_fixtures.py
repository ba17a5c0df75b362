"""Pytest plugin: this project's container images, built once per session on the session's Docker engine.

deploy_images (session) -> DeployImages: the API and worker images built from Dockerfile.api / Dockerfile.worker
through the offline wheelhouse path, FROM a local stand-in for the official slim Python image, which also
serves as the Redis image (it carries Debian's redis-server).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.base_image import import_base
from tests.support.deploy import build_context, build_image, wheelhouse
from tests.support.services import require


@dataclass(frozen=True)
class DeployImages:
    base: str
    api: str
    worker: str
    context: Path

    @property
    def redis(self) -> str:
        return self.base


@pytest.fixture(scope="session")
def deploy_images(docker_engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployImages]:
    require(os.path.exists("/usr/sbin/debootstrap"), "debootstrap is not installed (apt-get install debootstrap)")
    base = import_base(docker_engine, "dhp-test-base:latest")
    context = build_context(tmp_path_factory.mktemp("image-context") / "context", wheelhouse())
    api = build_image(docker_engine, context, "Dockerfile.api", "dhp-test-api:latest", base)
    worker = build_image(docker_engine, context, "Dockerfile.worker", "dhp-test-worker:latest", base)
    yield DeployImages(base=base, api=api, worker=worker, context=context)
