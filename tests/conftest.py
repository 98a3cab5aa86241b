"""Fixtures that start real parts: a mosquitto broker per test, the module as a process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from simulator.billing import BillingSimulator, KeyInfo
from simulator.faultproxy import FaultProxy
from tests.support import API_KEY, Broker, Collector, Module, start_broker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    workdir = tmp_path / "broker"
    workdir.mkdir()
    b = start_broker(workdir)
    yield b
    b.stop()


@pytest.fixture
def start_module(tmp_path: Path, broker: Broker,
                 billing: BillingSimulator) -> Iterator[Callable[..., Module]]:
    """Start the module as a process, by default wired to the billing simulator."""
    started: list[Module] = []

    def start(*extra: str, wait_ready: bool = True, **kwargs: object) -> Module:
        kwargs.setdefault("billing", billing.url)
        kwargs.setdefault("public_key", billing.public_key_b64)
        module = Module(tmp_path, broker.port, *extra, **kwargs)  # type: ignore[arg-type]
        started.append(module)
        return module.start(wait_ready=wait_ready)

    yield start
    for module in started:
        module.stop()


@pytest.fixture
def billing(tmp_path: Path) -> Iterator[BillingSimulator]:
    sim = BillingSimulator(tmp_path / "billing.db",
                           keys={API_KEY: KeyInfo(), "other-type-key": KeyInfo("speech")})
    sim.start()
    yield sim
    sim.stop()


@pytest.fixture
def proxy(billing: BillingSimulator) -> Iterator[FaultProxy]:
    p = FaultProxy(billing.port).start()
    yield p
    p.stop()


@pytest.fixture
def collector(broker: Broker) -> Iterator[Collector]:
    c = Collector(broker.port, ["em/results", "em/errors", "em/status"])
    yield c
    c.close()
