"""Leases: the offline grace the billing endpoint grants, signed with the vendor's key.

``{"containerId", "containerType", "status", "issuedAt", "expiresAt", "keyId",
"signature"}``; times are server epoch milliseconds and ``expiresAt -
issuedAt`` is the grace. A lease counts only when its signature verifies with
``Billing:PublicKey`` and it names this installation and container type, so
it can neither be forged, edited, nor copied from another device. The last
good lease is kept in ``Data:Path/lease.json`` and verified again on load; a
write that fails (a full disk) is logged and the lease kept in memory.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_module.identity import Identity
from edge_module.licensing.signing import verify
from edge_module.logs import get_logger

log = get_logger("lease")


@dataclass(frozen=True)
class Lease:
    container_id: str
    container_type: str
    status: str
    issued_at: int
    expires_at: int
    key_id: str
    raw: dict[str, Any]

    @property
    def grace_ms(self) -> int:
        return self.expires_at - self.issued_at


def parse_lease(obj: Any, public_key: Ed25519PublicKey | None,
                identity: Identity) -> tuple[Lease | None, str | None]:
    """The lease, or None with the reason it does not count."""
    if obj is None:
        return None, None
    if public_key is None:
        return None, "Billing:PublicKey is not set, so leases cannot be verified"
    if not verify(obj, public_key):
        return None, "the lease signature does not verify"
    try:
        lease = Lease(str(obj["containerId"]), str(obj["containerType"]), str(obj["status"]),
                      int(obj["issuedAt"]), int(obj["expiresAt"]), str(obj["keyId"]), dict(obj))
    except (KeyError, TypeError, ValueError):
        return None, "the lease is malformed"
    if lease.container_id != identity.container_id:
        return None, "the lease names another installation"
    if lease.container_type != identity.container_type:
        return None, "the lease names another container type"
    if lease.expires_at < lease.issued_at:
        return None, "the lease expires before it was issued"
    return lease, None


class LeaseStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self, public_key: Ed25519PublicKey | None, identity: Identity) -> Lease | None:
        try:
            obj = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        lease, problem = parse_lease(obj, public_key, identity)
        if problem is not None:
            log.warning("stored_lease_rejected", reason=problem,
                        effect="no offline grace until the next successful check")
        return lease

    def save(self, lease: Lease) -> bool:
        """Keep ``lease`` on disk; False (logged) when it cannot be written.

        A full disk or an I/O error must not stop the caller (the uploader or the
        licensing thread): the lease stays in memory and the next answer that
        carries one tries again. The previous file stays whole (written aside,
        then renamed).
        """
        tmp = self.path.with_suffix(".tmp")
        try:
            with open(tmp, "w") as handle:
                json.dump(lease.raw, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.error("lease_save_failed", path=str(self.path), error=str(exc),
                      effect="the new lease is used from memory; after a restart the "
                      "previous stored lease applies until the next successful check",
                      fix="free space under Data:Path (or fix its permissions)")
            return False
        return True
