"""Licence files: disconnected mode's proof of entitlement.

``edge-module run ... DownloadLicense=True Mounts:License=<dir>`` asks the
billing endpoint (``GET /billing/v1/license``) for a licence and writes it to
``<dir>/edge-module.license``. The licence is JSON signed by the vendor
(Ed25519, canonical JSON like leases) and holds: ``licenseId``,
``containerType``, ``containerId`` (the installation it is bound to),
``issuedAt``, ``expiresAt``, an optional transaction ``quota``, the module's
own ``modulePublicKey`` (which signs the exported usage logs, so the vendor
can verify them later), and optional ``modelKeys`` (model name -> base64
AES-256 key) that unlock encrypted models.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from edge_module.billing_api import BillingClient
from edge_module.exceptions import EdgeModuleError
from edge_module.identity import Identity
from edge_module.licensing.statuses import LicenseFileStatus, explain
from edge_module.trust.keys import TrustedKeys

LICENSE_FILE = "edge-module.license"


class LicenseError(EdgeModuleError):
    """The licence file is missing, invalid or expired; ``status`` says which."""

    def __init__(self, status: str, detail: str = "") -> None:
        explanation = explain(status)
        text = f"{status}: {explanation.message}"
        if detail:
            text += f" ({detail})"
        super().__init__(f"{text}; fix: {explanation.remedy}")
        self.status = status


@dataclass(frozen=True)
class License:
    license_id: str
    container_type: str
    container_id: str
    issued_at: int
    expires_at: int
    quota: int | None
    module_public_key: str
    model_keys: dict[str, str]
    raw: dict[str, Any]


def license_path(folder: Path) -> Path:
    return folder / LICENSE_FILE


def load_license(folder: Path, keys: TrustedKeys, identity: Identity,
                 now_ms: int) -> License:
    """Read and verify the licence; raise LicenseError with the status otherwise."""
    if not folder.is_dir():
        raise LicenseError(LicenseFileStatus.NOT_FOUND, f"{folder} is not a directory")
    path = license_path(folder)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise LicenseError(LicenseFileStatus.NOT_FOUND, f"no {LICENSE_FILE} in {folder}") \
            from None
    except (OSError, ValueError) as exc:
        raise LicenseError(LicenseFileStatus.INVALID, f"unreadable: {exc}") from exc
    problem = keys.check(obj, now_ms)
    if problem is not None:
        raise LicenseError(LicenseFileStatus.INVALID, f"not accepted: {problem}")
    try:
        lic = License(str(obj["licenseId"]), str(obj["containerType"]),
                      str(obj["containerId"]), int(obj["issuedAt"]), int(obj["expiresAt"]),
                      int(obj["quota"]) if obj.get("quota") is not None else None,
                      str(obj["modulePublicKey"]), dict(obj.get("modelKeys") or {}), obj)
    except (KeyError, TypeError, ValueError) as exc:
        raise LicenseError(LicenseFileStatus.INVALID, f"malformed: {exc}") from exc
    if lic.container_type != identity.container_type:
        raise LicenseError(LicenseFileStatus.INVALID,
                           f"issued for container type {lic.container_type}")
    if lic.container_id != identity.container_id:
        raise LicenseError(LicenseFileStatus.INVALID, "issued for another installation "
                           "(download it with this Data:Path)")
    if now_ms >= lic.expires_at:
        raise LicenseError(LicenseFileStatus.EXPIRED)
    return lic


def download_license(client: BillingClient, identity: Identity, module_public_key: str,
                     folder: Path) -> Path:
    """GET /billing/v1/license and write the signed file into ``folder``."""
    query = urlencode({"containerType": identity.container_type,
                       "containerId": identity.container_id,
                       "modulePublicKey": module_public_key})
    answer = client.get(f"/billing/v1/license?{query}")
    if not answer.ok or not isinstance(answer.body.get("license"), dict):
        reason = answer.error or f"HTTP {answer.http_status}"
        raise LicenseError(str(answer.status), f"the licence could not be downloaded: {reason}")
    folder.mkdir(parents=True, exist_ok=True)
    path = license_path(folder)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(answer.body["license"], indent=2) + "\n")
    os.replace(tmp, path)
    return path


class LicenseFileSource:
    """The licensing decision in disconnected mode (see licensing/service.py)."""

    def __init__(self, lic: License, used_quantity: Any) -> None:
        self.license = lic
        self._used = used_quantity  # () -> int: quantity recorded under this licence

    def status(self, now_ms: int) -> tuple[str, str | None, int | None]:
        lic = self.license
        if now_ms >= lic.expires_at:
            return LicenseFileStatus.EXPIRED, None, lic.expires_at
        if lic.quota is not None and self._used() >= lic.quota:
            return "OutOfQuota", f"the licence allows {lic.quota} transactions and all are " \
                "used", lic.expires_at
        return "Valid", "the licence file is valid", lic.expires_at
