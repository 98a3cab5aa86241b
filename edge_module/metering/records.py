"""Usage records, shaped as Azure AI containers send them.

``{"id", "containerType", "containerVersion", "containerId",
"meter": {"name", "quantity"}, "requestTime", "apiType"}``

A record describes a transaction and nothing of its content: no payload
bytes, results, topics or ids taken from the input. ``id`` is a fresh UUID,
``requestTime`` epoch milliseconds. ``RecordWriter`` is the only code that
writes the wire form; the billing simulator checks it against
docs/billing-api.openapi.json.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from edge_module.identity import Identity


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


class RecordWriter:
    """The one producer of the usage record's wire form (compact JSON, ``RECORD_FIELDS``
    order). The installation's part is escaped once; strings that need no escaping
    (ids, meter names in practice) skip ``json.dumps``, which keeps a large backlog's
    upload fast (the drain builds tens of thousands of records a second)."""

    def __init__(self, identity: Identity) -> None:
        self._type = _js(identity.container_type)
        self._container = _js(identity.container_id)

    def json(self, record_id: str, version: str, meter_name: str, quantity: int,
             request_time_ms: int, api_type: str) -> str:
        return (f'{{"id":{_js(record_id)},"containerType":{self._type},'
                f'"containerVersion":{_js(version)},"containerId":{self._container},'
                f'"meter":{{"name":{_js(meter_name)},"quantity":{int(quantity)}}},'
                f'"requestTime":{int(request_time_ms)},"apiType":{_js(api_type)}}}')


_PLAIN = re.compile(r"[A-Za-z0-9 _.:/+-]*")


def _js(text: str) -> str:
    """A JSON string literal for ``text``."""
    return f'"{text}"' if _PLAIN.fullmatch(text) else json.dumps(text)
