"""Decoded inputs waiting for inference are bounded in bytes, over a real mosquitto.

A ``uint8`` ``.npy`` of 4 MiB sent to a model of one ``int64`` input decodes to 32 MiB.
Counted in requests, two batches of them waiting (plus those held for later batches)
would hold far more memory than their messages: a slow model and a burst of them could
take gigabytes. With ``Pipeline:MaxQueuedMb`` the decoded inputs past the budget are
answered ``Overloaded`` (retryable, unbilled) instead of queued: every message is answered
once, the ledger holds one record per result, and the module's peak RSS (VmHWM) stays
within a bound that the old request count broke.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from simulator.billing import BillingSimulator, KeyInfo
from tests.models import wide_int_model
from tests.support import (
    API_KEY,
    Collector,
    Module,
    ledger_records,
    start_broker,
    wait_until,
)

ELEMENTS = 4 * 1024 * 1024  # one item: 4 MiB as uint8, 32 MiB once decoded as int64
BUDGET_MB = 64
BURST = 24
RESULTS, ERRORS = "dm/results", "dm/errors"


def _vm_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no {field}")


def _payload() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ones((1, ELEMENTS), np.uint8))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Module, Collector]]:
    root = tmp_path_factory.mktemp("decoded-memory")
    broker = start_broker(root / "broker")
    billing = BillingSimulator(root / "billing.db", keys={API_KEY: KeyInfo()})
    billing.start()
    model = wide_int_model(root / "models", ELEMENTS)
    module = Module(root, broker.port, f"Model:Path={model}",
                    f"Pipeline:MaxPayloadBytes={5 * 1024 * 1024}",
                    f"Pipeline:MaxQueuedMb={BUDGET_MB}", "Pipeline:MaxBatchSize=8",
                    "Pipeline:MaxQueueDelayMs=0", billing=billing.url, api_key=API_KEY,
                    public_key=billing.public_key_b64, prefix="dm")
    collector = Collector(broker.port, [RESULTS, ERRORS])
    try:
        module.start()
        yield module, collector
    finally:
        collector.close()
        module.stop()
        billing.stop()
        broker.stop()


def _send(collector: Collector, payload: bytes, name: str) -> None:
    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = name.encode()
    collector.publish("dm/in/wide", payload, properties=props)


def test_a_burst_of_inputs_that_decode_large_is_bounded_in_bytes_not_requests(
        served: tuple[Module, Collector]) -> None:
    module, collector = served
    assert module.process is not None
    pid = module.process.pid
    payload = _payload()
    _send(collector, payload, "warm")  # the model's arena for this size, allocated once
    collector.wait(RESULTS, 1, timeout=30)
    steady_kb = _vm_kb(pid, "VmRSS")

    for i in range(BURST):
        _send(collector, payload, f"b{i}")
    wait_until(lambda: len(collector.on(RESULTS)) + len(collector.on(ERRORS)) >= 1 + BURST,
               120, f"the burst answered; log:\n{module.log_tail()}")
    time.sleep(0.5)  # a second answer to any input would have arrived by now
    peak_kb = _vm_kb(pid, "VmHWM")

    results = collector.json(RESULTS)
    errors = collector.json(ERRORS)
    ids = [r["id"] for r in results] + [e["id"] for e in errors]
    assert sorted(ids) == sorted(["warm"] + [f"b{i}" for i in range(BURST)])  # once each
    assert {e["error"]["code"] for e in errors} == {"Overloaded"}
    assert errors and all("MaxQueuedMb" in e["error"]["message"] for e in errors)
    assert len(results) >= 2  # the burst was served as far as the budget allowed
    assert ledger_records(module) == len(results)  # Overloaded is never billed
    grown_mb = (peak_kb - steady_kb) / 1024
    print(f"\nsteady RSS {steady_kb / 1024:.0f} MB, peak {peak_kb / 1024:.0f} MB, "
          f"{len(results)} answered, {len(errors)} Overloaded")
    # The budget's 64 MB, the batch in inference and its stacked copy (32 MB each), a
    # decode in progress and the raw messages waiting in the intake: well under what
    # 16 queued decoded inputs alone (512 MB) would take.
    assert grown_mb < 320, f"peak RSS grew {grown_mb:.0f} MB over the steady state"
    assert module.ready()
