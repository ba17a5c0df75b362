"""Make the fixture files in testdata/ (see testdata/README.md). Run from the repository root:

    .venv/bin/python -m tests.support.make_testdata [docker-save|schema1|oci-index|multi-member ...]

Each file comes from the real tool that writes such files wherever one runs here: ``docker save`` on a private
dockerd, CNCF distribution's schema1 conversion, htslib's ``bgzip``. Only the OCI index is written by this script,
in the shape BuildKit gives indexes with attestations. The files are committed; tests read them, they never run
this. Re-running it changes the bytes (build times, signing keys), so tests must not depend on more than a file's
shape and the facts testdata/README.md records.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import httpx

from tests.support.images import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    make_config,
    make_layer,
    sha,
)
from tests.support.pushing import push_image
from tests.support.registry import start_registry
from tests.support.services import start_dockerd
from tests.support.testdata import (
    DOCKER_SAVE,
    DOCKER_SAVE_TAG,
    MULTI_MEMBER_LAYER,
    OCI_INDEX_WITH_ATTESTATIONS,
    SCHEMA1,
    TESTDATA,
)

IN_TOTO = "application/vnd.in-toto+json"

DOCKERFILE = """FROM scratch
COPY hello.txt /hello.txt
COPY etc/ /etc/
ENV GREETING=hello
WORKDIR /
CMD ["/hello"]
"""


def docker_save() -> None:
    """A two-layer image built FROM scratch by dockerd 20.10's classic builder, then ``docker save``d."""
    engine = start_dockerd()
    try:
        with tempfile.TemporaryDirectory() as context:
            root = Path(context)
            (root / "Dockerfile").write_text(DOCKERFILE)
            (root / "hello.txt").write_text("hello from docker save\n")
            (root / "etc").mkdir()
            (root / "etc" / "os-release").write_text('NAME="dhp testdata"\n')
            engine.run("build", "--network", "none", "-t", DOCKER_SAVE_TAG, str(root),
                       env={"DOCKER_BUILDKIT": "0"})
        engine.run("save", "-o", str(DOCKER_SAVE), DOCKER_SAVE_TAG)
        DOCKER_SAVE.chmod(0o644)
    finally:
        engine.stop()


def schema1() -> None:
    """What CNCF distribution 2.8 answers a manifest GET without our Accept list: a signed schema1 manifest."""
    with tempfile.TemporaryDirectory() as workdir:
        registry = start_registry(Path(workdir))
        try:
            image = push_image(registry.url, "testdata/old", "v1", [make_layer({"etc/hostname": b"old\n"})])
            response = httpx.get(f"{registry.url}/v2/{image.repository}/manifests/v1",
                                 headers={"Accept": "application/json"}, trust_env=False)
            response.raise_for_status()
        finally:
            registry.stop()
    print(f"schema1: Content-Type {response.headers['content-type']}, "
          f"Docker-Content-Digest {response.headers['docker-content-digest']}, sha256 of the body {sha(response.content)}")
    SCHEMA1.write_bytes(response.content)


def _oci_image(architecture: str, variant: str | None) -> tuple[dict, bytes]:
    layer = make_layer({"etc/arch": architecture.encode() + b"\n"})
    config = make_config([layer], architecture=architecture, variant=variant)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": layer.media_type_for("oci"), "digest": layer.digest, "size": layer.size}],
    }).encode()
    platform = {"architecture": architecture, "os": "linux", **({"variant": variant} if variant else {})}
    return {"mediaType": OCI_MANIFEST, "digest": sha(manifest), "size": len(manifest), "platform": platform}, manifest


def _attestation(subject: dict) -> dict:
    statement = json.dumps({
        "_type": "https://in-toto.io/Statement/v0.1", "predicateType": "https://slsa.dev/provenance/v0.2",
        "subject": [{"name": "_", "digest": {"sha256": subject["digest"].removeprefix("sha256:")}}],
        "predicate": {"builder": {"id": ""}, "buildType": "https://mobyproject.org/buildkit@v1"},
    }).encode()
    config = json.dumps({"architecture": "unknown", "os": "unknown", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [sha(statement)]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": IN_TOTO, "digest": sha(statement), "size": len(statement),
                    "annotations": {"in-toto.io/predicate-type": "https://slsa.dev/provenance/v0.2"}}],
    }).encode()
    return {"mediaType": OCI_MANIFEST, "digest": sha(manifest), "size": len(manifest),
            "annotations": {"vnd.docker.reference.digest": subject["digest"],
                            "vnd.docker.reference.type": "attestation-manifest"},
            "platform": {"architecture": "unknown", "os": "unknown"}}


def oci_index() -> None:
    """An index as ``docker buildx build --platform linux/amd64,linux/arm64 --provenance=true`` pushes it: the
    runnable manifests first, then one attestation manifest per platform (unknown/unknown, annotated)."""
    images = [_oci_image("amd64", None)[0], _oci_image("arm64", "v8")[0]]
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX,
             "manifests": images + [_attestation(image) for image in images]}
    OCI_INDEX_WITH_ATTESTATIONS.write_text(json.dumps(index, indent=2) + "\n")


def multi_member() -> None:
    """A layer tar compressed by htslib's bgzip: one gzip member per 64 KiB block, then an empty end member."""
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(4000)).encode()
    tar = make_layer({"usr/share/doc/fox.txt": text, "etc/motd": b"multi-member gzip\n"},
                     compression="none").tar
    blob = subprocess.run(["bgzip", "-c"], input=tar, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as check:  # a readable tar, before it is written
        assert check.getnames()
    print(f"multi-member: diff_id {sha(tar)} ({len(tar)} bytes of tar), digest {sha(blob)} ({len(blob)} bytes)")
    MULTI_MEMBER_LAYER.write_bytes(blob)


MAKERS = {"docker-save": docker_save, "schema1": schema1, "oci-index": oci_index, "multi-member": multi_member}


def main(names: list[str]) -> None:
    TESTDATA.mkdir(exist_ok=True)
    for name in names or list(MAKERS):
        MAKERS[name]()


if __name__ == "__main__":
    main(sys.argv[1:])
