"""The contract between the pipeline and a transport.

A transport hands each input to the pipeline as an ``Inbound`` and sends what
the pipeline answers. It must call ``Inbound.settle`` only after the answer to
that input has been accepted by the next hop (the broker or edgeHub): that is
when the input may be acknowledged, so a crash in between leads to a
redelivery, never to a lost message.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Inbound:
    """One input message, transport-neutral."""

    payload: bytes
    source: str  # MQTT topic or edgeHub input name
    correlation_id: str | None = None
    reply_to: str | None = None
    content_type: str | None = None
    received: float = field(default_factory=time.perf_counter)
    settle: Callable[[], None] = lambda: None
    # Identifies this delivery within the transport session (MQTT QoS 1: the packet id),
    # and whether the transport says it was delivered before (MQTT DUP flag).
    delivery_key: str | None = None
    redelivered: bool = False
    # The model (and version) the client asked for, when the transport tells one (a topic
    # level, a field, an edgeHub input, an OIP v2 URL); None: the default model.
    # edge_module/inference/catalog.py resolves them.
    model: str | None = None
    version: str | None = None

    def claim(self) -> bool:
        """Called by the pipeline just before this input's usage is recorded: False when
        nobody waits for the answer any more (an HTTP/gRPC client that timed out), so it is
        neither billed nor sent. Always True for broker transports."""
        return True


class Deliver(Protocol):
    def __call__(self, inbound: Inbound) -> None: ...


class Transport(Protocol):
    """What the pipeline needs from a transport."""

    def start(self, deliver: Deliver) -> None:
        """Connect and start handing inputs to ``deliver`` (which may block)."""

    def send_result(self, inbound: Inbound, body: bytes) -> None:
        """Send a result; settle ``inbound`` once the next hop has it."""

    def send_error(self, inbound: Inbound, body: bytes) -> None:
        """Send an error envelope; settle ``inbound`` once the next hop has it."""

    def stop_intake(self) -> None:
        """Take no more input; inputs not yet taken stay with the broker."""

    def close(self, timeout: float) -> None:
        """Wait up to ``timeout`` for sends in flight, announce offline, disconnect."""

    @property
    def connected(self) -> bool:
        """True while both intake and output are connected."""
