"""Usage records, shaped as Azure AI containers send them.

``{"id", "containerType", "containerVersion", "containerId",
"meter": {"name", "quantity"}, "requestTime", "apiType"}``

A record describes a transaction and nothing of its content: no payload
bytes, results, topics or ids taken from the input. ``id`` is a fresh UUID,
``requestTime`` epoch milliseconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Identity:
    """Who is billed: the container type, its version, and the installation id."""

    container_type: str
    container_version: str
    container_id: str

    def as_dict(self) -> dict[str, str]:
        return {"containerType": self.container_type,
                "containerVersion": self.container_version,
                "containerId": self.container_id}


@dataclass(frozen=True)
class MeterSpec:
    """What a transaction is billed as: the model descriptor's meter and apiType."""

    name: str
    api_type: str


@dataclass(frozen=True)
class Usage:
    """One transaction to record.

    ``delivery_key`` and ``digest`` identify the input delivery (for MQTT QoS 1:
    the packet id and a digest of the payload), so that a redelivery after a
    crash is recognised as a replay and not billed twice. They stay in the
    local ledger and are never uploaded.
    """

    quantity: int
    delivery_key: str | None = None
    digest: bytes | None = None


RECORD_FIELDS = ("id", "containerType", "containerVersion", "containerId", "meter",
                 "requestTime", "apiType")


def record_json(record_id: str, identity: Identity, version: str, meter_name: str,
                quantity: int, request_time_ms: int, api_type: str) -> str:
    """The wire form of one record (compact JSON, stable key order)."""
    return json.dumps({
        "id": record_id,
        "containerType": identity.container_type,
        "containerVersion": version,
        "containerId": identity.container_id,
        "meter": {"name": meter_name, "quantity": quantity},
        "requestTime": request_time_ms,
        "apiType": api_type,
    }, separators=(",", ":"))
