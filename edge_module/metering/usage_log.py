"""Usage logs of disconnected mode: monthly, hash-chained, signed by the module.

Under ``Mounts:Output/usage-logs/`` one JSON-lines file per month
(``2026-11.jsonl``). Each line is an entry summarising the ledger records
since the previous entry::

    {"seq", "containerId", "containerType", "periodStart", "periodEnd",
     "lastRecordSeq", "meters": [{"name", "apiType", "quantity", "records"}],
     "prevHash", "hash", "signature"}

``hash`` is the SHA-256 of the canonical JSON of the entry without ``hash``
and ``signature``; ``prevHash`` is the previous entry's hash (the chain runs
across months); ``signature`` is the module's Ed25519 signature over the
entry without ``signature``. The module's public key is certified in its
licence file, so the vendor can check that no entry was edited, dropped or
reordered (``edge-module usage-log verify``) and reconcile it when a link
exists (``edge-module reconcile``).

Azure AI containers' view of the same data is served at
``/records/usage-logs/{month}/{year}``: ``{"apiType", "serviceName",
"meters": [{"name", "quantity"}]}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from edge_module.identity import Identity
from edge_module.metering.ledger import Ledger
from edge_module.trust.signing import canonical, raw_public, sign, verify

GENESIS = "0" * 64


def entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k not in ("hash", "signature", "keyId")}
    return hashlib.sha256(canonical(body)).hexdigest()


def _month(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m")


class UsageLog:
    def __init__(self, folder: Path, ledger: Ledger, identity: Identity,
                 key: Ed25519PrivateKey, clock_ms: Any) -> None:
        self.folder = folder / "usage-logs"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ledger = ledger
        self.identity = identity
        self.key = key
        self.clock_ms = clock_ms
        self._lock = threading.Lock()
        import base64

        (folder / "module-public-key.b64").write_text(
            base64.b64encode(raw_public(key.public_key())).decode() + "\n")
        last = self._last_entry()
        self._seq = int(last["seq"]) if last else 0
        self._prev = str(last["hash"]) if last else GENESIS
        self._last_record = int(last["lastRecordSeq"]) if last else 0

    def _files(self) -> list[Path]:
        return sorted(self.folder.glob("*.jsonl"))

    def _last_entry(self) -> dict[str, Any] | None:
        for path in reversed(self._files()):
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            if lines:
                return dict(json.loads(lines[-1]))
        return None

    def export(self) -> dict[str, Any] | None:
        """Append an entry for the records since the last one (None when there are none)."""
        with self._lock:
            last_seq, meters = self.ledger.summarise_after(self._last_record)
            if not meters:
                return None
            now = self.clock_ms()
            entry: dict[str, Any] = {
                "seq": self._seq + 1,
                "containerId": self.identity.container_id,
                "containerType": self.identity.container_type,
                "periodStart": min(m["first"] for m in meters),
                "periodEnd": max(m["last"] for m in meters),
                "lastRecordSeq": last_seq,
                "meters": [{k: m[k] for k in ("name", "apiType", "quantity", "records")}
                           for m in meters],
                "prevHash": self._prev,
                "exportedAt": now,
            }
            entry["hash"] = entry_hash(entry)
            signed = sign(entry, self.key)
            path = self.folder / f"{_month(entry['periodEnd'])}.jsonl"
            with open(path, "a") as handle:
                handle.write(json.dumps(signed, separators=(",", ":")) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            self._seq, self._prev, self._last_record = entry["seq"], entry["hash"], last_seq
            return signed

    def months(self) -> list[dict[str, Any]]:
        out = []
        for path in self._files():
            year, month = path.stem.split("-")
            out.append({"month": int(month), "year": int(year),
                        "url": f"/records/usage-logs/{int(month)}/{year}"})
        return out

    def month(self, month: int, year: int, service_name: str) -> dict[str, Any] | None:
        path = self.folder / f"{year:04d}-{month:02d}.jsonl"
        if not path.exists():
            return None
        entries = read_entries([path])
        totals: dict[tuple[str, str], int] = {}
        for entry in entries:
            for meter in entry["meters"]:
                key = (meter["apiType"], meter["name"])
                totals[key] = totals.get(key, 0) + int(meter["quantity"])
        api_types = sorted({k[0] for k in totals})
        return {
            "apiType": api_types[0] if len(api_types) == 1 else ",".join(api_types),
            "serviceName": service_name,
            "meters": [{"name": name, "quantity": q} for (_, name), q in sorted(totals.items())],
            "entries": len(entries),
        }


def read_entries(paths: list[Path]) -> list[dict[str, Any]]:
    entries = []
    for path in sorted(paths):
        for line in path.read_text().splitlines():
            if line.strip():
                entries.append(json.loads(line))
    return entries


@dataclass
class Verification:
    ok: bool
    entries: int
    quantity: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def verify_entries(entries: list[dict[str, Any]], public_key: Ed25519PublicKey) -> Verification:
    """Check hashes, signatures, the chain and the sequence of a usage log."""
    result = Verification(True, len(entries))
    prev = GENESIS
    for index, entry in enumerate(entries, start=1):
        where = f"entry {entry.get('seq', index)}"
        if entry.get("seq") != index:
            result.problems.append(f"{where}: sequence gap or reorder (expected {index})")
        if entry.get("prevHash") != prev:
            result.problems.append(f"{where}: does not link to the previous entry")
        if entry_hash(entry) != entry.get("hash"):
            result.problems.append(f"{where}: content does not match its hash (edited)")
        if not verify(entry, public_key):
            result.problems.append(f"{where}: signature does not verify")
        prev = str(entry.get("hash"))
        for meter in entry.get("meters", []):
            name = str(meter.get("name"))
            result.quantity[name] = result.quantity.get(name, 0) + int(meter.get("quantity", 0))
    result.ok = not result.problems
    return result
