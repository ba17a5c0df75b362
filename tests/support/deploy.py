"""Building this project's container images in tests: a build context, an offline wheelhouse, `docker build`.

The wheelhouse holds every dependency's wheel (and setuptools, which builds our own wheel inside the image),
made on this host with `pip wheel` and kept under ~/.cache/docker-http-passthrough-tests/ keyed by a hash of
pyproject.toml, so only a changed dependency list reaches the package index again.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support.base_image import CACHE_ROOT
from tests.support.services import REPO_ROOT, child_env

# The base image's Python is Debian's 3.11.2, this host's may be newer: wheels that only older patch releases
# need (redis wants async-timeout before 3.11.3) are added by hand, since pip resolves for the running Python.
IMAGE_PYTHON_EXTRAS = ("async-timeout>=4.0.3",)


def wheelhouse() -> Path:
    """Wheels of every dependency (not of this package), cached per pyproject.toml."""
    key = hashlib.sha256((REPO_ROOT / "pyproject.toml").read_bytes() + sys.version.encode()).hexdigest()[:16]
    target = CACHE_ROOT / f"wheels-{key}"
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(CACHE_ROOT / "wheels.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            partial = Path(tempfile.mkdtemp(prefix="wheels-", dir=CACHE_ROOT))
            subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(partial),
                            str(REPO_ROOT), "setuptools>=77", *IMAGE_PYTHON_EXTRAS], check=True, capture_output=True, timeout=900,
                           env=child_env({"PIP_DISABLE_PIP_VERSION_CHECK": "1"}))
            for own in partial.glob("docker_http_passthrough-*.whl"):
                own.unlink()  # built from the context's source inside the image
            os.replace(partial, target)
    return target


def build_context(directory: Path, wheels: Path | None) -> Path:
    """A copy of the working tree as `docker build .` would see it from the repository root (the files git
    tracks or would track; .dockerignore then picks what the build gets); ``wheels`` fills its wheelhouse/."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO_ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, directory / name)
    (directory / "wheelhouse").mkdir(parents=True, exist_ok=True)
    if wheels is not None:
        for wheel in wheels.glob("*.whl"):
            shutil.copy2(wheel, directory / "wheelhouse" / wheel.name)
    return directory


def build_image(engine, context: Path, dockerfile: str, tag: str, base: str, *extra: str) -> str:
    engine.run("build", "--quiet", "--file", str(context / dockerfile), "--tag", tag, "--build-arg",
               f"BASE_IMAGE={base}", "--build-arg", "REVISION=test", *extra, str(context), timeout=900)
    return tag
