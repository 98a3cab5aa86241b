"""Signed usage receipts: the only thing that settles a ledger record (no thread).

The answer to ``POST /billing/v1/usage`` carries ``receipt``: ``{"containerId",
"issuedAt", "accepted": [ids], "duplicate": [ids], "rejected": [{"id",
"reason"}], "keyId", "signature"}``, signed by a key this build trusts
(edge_module/trust/). Record ids are random and made by the module, so a
receipt cannot be replayed for other records. An answer whose receipt is
missing, unsigned, signed by an unknown or retired key, or for another
installation settles nothing: its records stay pending and are offered again.
The uploader (metering/drain.py) calls ``check_receipt`` on its own thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edge_module.trust.keys import TrustedKeys


@dataclass(frozen=True)
class Receipt:
    accepted: frozenset[str]
    duplicate: frozenset[str]
    rejected: dict[str, str]
    raw: dict[str, Any]


def _ids(value: Any) -> frozenset[str] | None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None
    return frozenset(value)


def check_receipt(body: dict[str, Any], keys: TrustedKeys, container_id: str,
                  now_ms: int) -> tuple[Receipt | None, str | None]:
    """The verified receipt of an upload answer, or None and why it does not count."""
    receipt = body.get("receipt")
    if receipt is None:
        return None, "the answer carries no signed receipt"
    problem = keys.check(receipt, now_ms)
    if problem is not None:
        return None, f"the receipt is not trusted: {problem}"
    if receipt.get("containerId") != container_id:
        return None, "the receipt names another installation"
    accepted = _ids(receipt.get("accepted", []))
    duplicate = _ids(receipt.get("duplicate", []))
    rejected_raw = receipt.get("rejected", [])
    if accepted is None or duplicate is None or not isinstance(rejected_raw, list):
        return None, "the receipt is malformed"
    rejected: dict[str, str] = {}
    for item in rejected_raw:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            return None, "the receipt is malformed"
        rejected[item["id"]] = str(item.get("reason") or "Rejected without a reason")
    return Receipt(accepted, duplicate, rejected, receipt), None
