"""Pytest plugin: this project's container images, built once per session on a Docker engine of their own.

deploy_engine (session) -> DockerEngine: a private dockerd for the deployment tests, so their images, containers
                           and compose stacks never show in the engine the other end-to-end tests share.
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
from tests.support.service_fixtures import private_docker_engine
from tests.support.services import DockerEngine, require


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
def deploy_engine() -> Iterator[DockerEngine]:
    yield from private_docker_engine()


@pytest.fixture(scope="session")
def deploy_images(deploy_engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployImages]:
    require(os.path.exists("/usr/sbin/debootstrap"), "debootstrap is not installed (apt-get install debootstrap)")
    base = import_base(deploy_engine, "dhp-test-base:latest")
    context = build_context(tmp_path_factory.mktemp("image-context") / "context", wheelhouse())
    api = build_image(deploy_engine, context, "Dockerfile.api", "dhp-test-api:latest", base)
    worker = build_image(deploy_engine, context, "Dockerfile.worker", "dhp-test-worker:latest", base)
    yield DeployImages(base=base, api=api, worker=worker, context=context)
