"""The fast tier: in-process tests of the pipeline's rules, run alone with ``make test-fast``.

Real parts still: the real digits model in onnxruntime, real SQLite ledgers in a
temporary folder. What is replaced is only the process boundary: a transport
that keeps what the pipeline sends instead of publishing it to a broker.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_module.config import ModelSettings
from edge_module.inference.models import Model, load_model
from edge_module.metering.ledger import Ledger
from edge_module.transport.base import Deliver, Inbound
from tests.support import IDENTITY, make_ledger

__all__ = ["IDENTITY", "RecordingTransport", "make_ledger"]



class RecordingTransport:
    """A transport without a network: answers are kept in order, inputs settled at once."""

    def __init__(self) -> None:
        self.results: list[tuple[Inbound, bytes]] = []
        self.errors: list[tuple[Inbound, bytes]] = []
        self._answered = threading.Condition()

    def start(self, deliver: Deliver) -> None:
        return None

    def send_result(self, inbound: Inbound, body: bytes) -> None:
        with self._answered:
            self.results.append((inbound, body))
            self._answered.notify_all()
        inbound.settle()

    def send_error(self, inbound: Inbound, body: bytes) -> None:
        with self._answered:
            self.errors.append((inbound, body))
            self._answered.notify_all()
        inbound.settle()

    def stop_intake(self) -> None:
        return None

    def close(self, timeout: float) -> None:
        return None

    @property
    def connected(self) -> bool:
        return True

    def wait_answers(self, count: int, timeout: float = 10) -> None:
        with self._answered:
            if not self._answered.wait_for(
                    lambda: len(self.results) + len(self.errors) >= count, timeout):
                raise AssertionError(f"{len(self.results) + len(self.errors)} of {count} "
                                     "inputs answered")


@pytest.fixture(scope="session")
def digits() -> Model:
    return load_model(ModelSettings.model_validate({"Name": "digits"}))


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    led = make_ledger(tmp_path / "ledger.db")
    yield led
    led.close()


@pytest.fixture
def transport() -> RecordingTransport:
    return RecordingTransport()
