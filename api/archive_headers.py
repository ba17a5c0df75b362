"""The headers of an archive response: name, type, size-independent ETag, and the manifest digest."""

from __future__ import annotations

from docker_http_passthrough.shared.archive import ArchivePlan
from docker_http_passthrough.shared.digests import name_hash

# Bump when the archive bytes for the same image change (it is part of the ETag).
ARCHIVE_LAYOUT = "docker-save-legacy-1"


def archive_etag(manifest_digest: str, repo_tag_name: str) -> str:
    """Strong: same manifest, same name, same layout version → same bytes."""
    return '"' + name_hash(ARCHIVE_LAYOUT, manifest_digest, repo_tag_name)[:40] + '"'


def archive_headers(plan: ArchivePlan, manifest_digest: str, filename: str) -> dict[str, str]:
    """Everything but the length (and the range), which depend on what is sent."""
    return {
        "Content-Disposition": f'attachment; filename="{filename}"',
        "Content-Type": "application/x-tar",
        "Accept-Ranges": "bytes",
        "ETag": archive_etag(manifest_digest, plan.repo_tag),
        "X-Manifest-Digest": manifest_digest,
    }
