"""The fixture files in testdata/, and what was recorded about each when it was made (testdata/README.md)."""

from __future__ import annotations

from pathlib import Path

TESTDATA = Path(__file__).resolve().parents[2] / "testdata"

# `docker save` by dockerd 20.10 of a two-layer image built FROM scratch.
DOCKER_SAVE = TESTDATA / "docker-save-20.10.tar"
DOCKER_SAVE_TAG = "dhp-testdata/hello:v1"

# A signed schema1 manifest, as CNCF distribution 2.8 converts one for a client without our Accept list, and the
# Docker-Content-Digest it sent with it (the digest of the manifest without its signatures, not of these bytes).
SCHEMA1 = TESTDATA / "schema1-prettyjws.json"
SCHEMA1_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v1+prettyjws"
SCHEMA1_DIGEST = "sha256:b340730ab956be3dc398f598d55153af69322e2398baaf6916f2567f40ae9552"

# An OCI index as BuildKit pushes a two-platform build with provenance: linux/amd64, linux/arm64/v8, then one
# attestation manifest (unknown/unknown) for each.
OCI_INDEX_WITH_ATTESTATIONS = TESTDATA / "oci-index-with-attestations.json"

# A layer tar compressed by htslib's bgzip: several gzip members and an empty last one.
MULTI_MEMBER_LAYER = TESTDATA / "multi-member-layer.tar.gz"
MULTI_MEMBER_DIFF_ID = "sha256:b593f2e9d2e7a3d3a06657c49147c8b73a4962c9efc6323c5c70018edf3709fd"
