"""What the two tiers agree on about a preparation job: its function, arguments, its id, and the Redis keys
it uses.

Job arguments are plain strings and dicts with no secret in them: RQ pickles arguments into Redis and workers
log job descriptions. Client credentials travel separately, encrypted with CREDENTIALS_KEY, under a key
that lives only while the job may run and is deleted when it ends.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import asdict, dataclass

from cryptography.fernet import Fernet, InvalidToken

from docker_http_passthrough.shared.digests import name_hash
from docker_http_passthrough.shared.targets import Credentials, RegistryTarget

# Enqueued by name so the API never imports the worker package.
JOB_FUNCTION = "docker_http_passthrough.worker.jobs.prepare"
# Names the same function had before the package was renamed; jobs still queued under them during an upgrade
# run on new workers as JOB_FUNCTION (same arguments; see job_queue.PreparationJob).
LEGACY_JOB_FUNCTIONS = ("worker.jobs.prepare",)
JOB_ID_PREFIX = "prepare-"

CREDENTIAL_SOURCES = ("anonymous", "settings", "client")


@dataclass
class Progress:
    """How far a preparation is; read by the status route (embedded) or copied to Redis by the worker."""

    layers_total: int = 0
    layers_done: int = 0
    bytes_total: int = 0  # compressed bytes to download, from the manifest
    bytes_done: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class JobSpec:
    target: dict  # RegistryTarget.to_dict()
    repository: str
    manifest_digest: str
    credential_source: str  # one of CREDENTIAL_SOURCES; "client" means sealed credentials under credentials_key()

    @property
    def registry(self) -> RegistryTarget:
        return RegistryTarget.from_dict(self.target)

    @property
    def key(self) -> str:
        return image_key(self.target["api_url"], self.repository, self.manifest_digest)

    @property
    def job_id(self) -> str:
        return job_id_for(self.key)

    def as_kwargs(self) -> dict:
        return asdict(self)


def image_key(registry_api_url: str, repository: str, manifest_digest: str) -> str:
    """One preparation per (registry, repository, manifest digest); the key names the job and the record."""
    return name_hash(registry_api_url, repository, manifest_digest)[:40]


def job_id_for(key: str) -> str:
    # RQ job ids allow letters, digits, "_" and "-" only.
    return JOB_ID_PREFIX + key


def key_of_job(job_id: str) -> str | None:
    """The image key a job id names; None for an id that is not one of ours."""
    return job_id.removeprefix(JOB_ID_PREFIX) if job_id.startswith(JOB_ID_PREFIX) else None


OUTCOME_PREFIX = "dhp:outcome:"


def outcome_key(job_id: str) -> str:
    """JSON {"ok": true} or {"ok": false, "error": …, "status": …, "message": …}, also published on this channel."""
    return OUTCOME_PREFIX + job_id


def heartbeat_key(job_id: str) -> str:
    return f"dhp:heartbeat:{job_id}"


def progress_key(job_id: str) -> str:
    """Hash of Progress fields, refreshed by the worker while the job runs."""
    return f"dhp:progress:{job_id}"


def credentials_key(job_id: str) -> str:
    return f"dhp:credentials:{job_id}"


OUTCOME_PATTERN = OUTCOME_PREFIX + "*"


def enqueue_lock_key(job_id: str) -> str:
    """Held while a job is started, joined, replaced or run again: one of those at a time per job."""
    return f"dhp:enqueue:{job_id}"


# The names of the workers that beat a presence key (see shared.presence).
WORKERS_KEY = "dhp:workers"


def presence_key(worker_name: str) -> str:
    """Exists while the worker beats: it lives WORKER_LOST_TIMEOUT and is refreshed every second."""
    return f"dhp:alive:{worker_name}"


def burial_key(worker_name: str) -> str:
    """Held by the one survivor cleaning up after a dead worker."""
    return f"dhp:burying:{worker_name}"


def _fernet(key: str) -> Fernet:
    # Any passphrase works: derive the 32-byte Fernet key from it, so operators need no special format.
    return Fernet(base64.urlsafe_b64encode(hashlib.sha256(key.encode()).digest()))


def seal_credentials(credentials: Credentials, key: str) -> bytes:
    return _fernet(key).encrypt(json.dumps([credentials.username, credentials.password]).encode())


def unseal_credentials(sealed: bytes, key: str) -> Credentials:
    try:
        username, password = json.loads(_fernet(key).decrypt(sealed))
    except (InvalidToken, ValueError):
        raise ValueError("sealed credentials cannot be opened: CREDENTIALS_KEY differs between API and worker") from None
    return Credentials(username, password)
