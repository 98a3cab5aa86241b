"""Leases and signed status answers: the grace the billing endpoint grants (no thread).

A lease is ``{"containerId", "containerType", "status", "issuedAt",
"expiresAt", "keyId", "signature", ...}``; times are server epoch milliseconds
and ``expiresAt - issuedAt`` is the grace. It counts only when a key this build
trusts (edge_module/trust/) signed it and it names this installation and
container type, so it can neither be forged, edited, nor copied from another
device. The last good lease is kept in ``Data:Path/lease.json`` and verified
again on load; a write that fails (a full disk) is logged and the lease kept
in memory.

The answer to a status call carries its lease with the ``nonce`` the module
sent: ``verify_status`` accepts it as proof of ``Valid`` only when it is
signed, names this installation, carries this call's nonce (so an old answer
cannot be replayed) and was issued no earlier than the lease the module holds.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_module.identity import Identity
from edge_module.logs import get_logger
from edge_module.trust.keys import TrustedKeys

log = get_logger("lease")

MAX_STATEMENT_AGE_MS = 86400_000  # a signed status older than this in trusted time is stale


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


def parse_lease(obj: Any, keys: TrustedKeys, identity: Identity,
                now_ms: int | None = None) -> tuple[Lease | None, str | None]:
    """The lease, or None with the reason it does not count (None, None: there was none)."""
    if obj is None:
        return None, None
    problem = keys.check(obj, now_ms)
    if problem is not None:
        return None, f"the lease is not trusted: {problem}"
    try:
        lease = Lease(str(obj["containerId"]), str(obj["containerType"]), str(obj["status"]),
                      int(obj["issuedAt"]), int(obj["expiresAt"]), str(obj["keyId"]), dict(obj))
    except (KeyError, TypeError, ValueError):
        return None, "the lease is malformed"
    if lease.container_id != identity.container_id:
        return None, "the lease names another installation"
    if lease.container_type != identity.container_type:
        return None, "the lease names another container type"
    if lease.status != "Valid":
        return None, f"the lease says {lease.status[:40]!r}, not Valid"
    if lease.expires_at < lease.issued_at:
        return None, "the lease expires before it was issued"
    return lease, None


def verify_status(body: dict[str, Any], keys: TrustedKeys, identity: Identity, nonce: str,
                  now_ms: int, held: Lease | None) -> tuple[Lease | None, str | None]:
    """The signed lease that proves a 200 status answer Valid, or None and why not."""
    if body.get("status") != "Valid":
        return None, "the answer does not say status Valid"
    statement = body.get("lease")
    if statement is None:
        return None, "the answer carries no signed statement (lease)"
    lease, problem = parse_lease(statement, keys, identity, now_ms)
    if lease is None:
        return None, problem
    if not hmac.compare_digest(str(statement.get("nonce", "")), nonce):
        return None, "the signed answer carries another call's nonce (a replay)"
    if held is not None and lease.issued_at < held.issued_at:
        return None, "the signed answer was issued before the lease already held"
    if lease.issued_at < now_ms - MAX_STATEMENT_AGE_MS:
        return None, "the signed answer was issued more than a day before trusted time (stale)"
    return lease, None


class LeaseStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self, keys: TrustedKeys, identity: Identity,
             now_ms: int | None = None) -> Lease | None:
        """The stored lease, if a key this build trusts now signed it for this installation
        (a lease signed by a key retired since does not count)."""
        try:
            obj = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("stored_lease_unreadable", path=str(self.path), reason=str(exc)[:200],
                        effect="no offline grace until the next successful check",
                        fix="nothing to do: the next Valid answer rewrites the file; do not "
                        "edit it")
            return None
        lease, problem = parse_lease(obj, keys, identity, now_ms)
        if problem is not None:
            log.warning("stored_lease_rejected", reason=problem,
                        effect="no offline grace until the next successful check",
                        fix="nothing to do: the next Valid answer brings a new lease")
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
