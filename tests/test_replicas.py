"""Replicas=N: one input stream split across processes, billed exactly once."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable

from simulator.billing import BillingSimulator
from tests.support import Collector, Module, wait_until


def test_two_replicas_share_the_stream_and_bill_each_message_once(
    start_module: Callable[..., Module], collector: Collector, billing: BillingSimulator
) -> None:
    module = start_module("Replicas=2", "Metering:MaxDelaySeconds=0.2", wait_ready=False)
    second = Module(module.workdir, 0)
    second.http_port = module.http_port + 1
    second.process = module.process  # the supervisor; replica 1 answers on the next port
    module.wait_ready()
    second.wait_ready()
    total = 200
    for i in range(total):
        body = {"id": f"r{i}", "tensor": [[[0.05 * (i % 20)] * 8] * 8]}
        collector.publish("em/in/x", json.dumps(body).encode())
    results = collector.wait("em/results", total)
    ids = [r["id"] for r in results]
    assert sorted(ids) == sorted(f"r{i}" for i in range(total))  # each exactly once
    per_replica = [m.metric("edge_module_results_published_total") for m in (module, second)]
    assert sum(per_replica) == total and min(per_replica) > 0, per_replica
    wait_until(lambda: billing.totals()["records"] == total, 20, "all billed once")
    containers = {r["containerId"] for r in billing.store.records()}
    assert len(containers) == 2  # one ledger, one installation id per replica
    module.signal(signal.SIGTERM)
    assert module.wait_exit(30) == 0
    assert second.http("/health")[0] == 0  # replica 1 has stopped too
