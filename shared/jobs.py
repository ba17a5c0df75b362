"""What the two tiers agree on about a preparation job: its function, arguments, and the Redis keys it uses.

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

from docker_http_passthrough.shared.registry import Credentials, RegistryTarget

# Enqueued by name so the API never imports the worker package.
JOB_FUNCTION = "docker_http_passthrough.worker.jobs.prepare"

CREDENTIAL_SOURCES = ("anonymous", "settings", "client")


@dataclass(frozen=True)
class JobSpec:
    target: dict  # RegistryTarget.to_dict()
    repository: str
    manifest_digest: str
    credential_source: str  # one of CREDENTIAL_SOURCES; "client" means sealed credentials under credentials_key()

    @property
    def registry(self) -> RegistryTarget:
        return RegistryTarget.from_dict(self.target)

    def as_kwargs(self) -> dict:
        return asdict(self)


def outcome_key(job_id: str) -> str:
    """JSON {"ok": true} or {"ok": false, "error": …, "status": …, "message": …}, also published on this channel."""
    return f"dhp:outcome:{job_id}"


def heartbeat_key(job_id: str) -> str:
    return f"dhp:heartbeat:{job_id}"


def progress_key(job_id: str) -> str:
    """Hash of shared.prepare.Progress fields, refreshed by the worker while the job runs."""
    return f"dhp:progress:{job_id}"


def credentials_key(job_id: str) -> str:
    return f"dhp:credentials:{job_id}"


OUTCOME_PATTERN = "dhp:outcome:*"


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
