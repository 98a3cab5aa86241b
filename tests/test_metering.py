"""Metering end to end: the module, a real mosquitto, the billing simulator, a fault proxy."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from simulator.billing import BillingSimulator
from simulator.faultproxy import FaultProxy
from tests.support import API_KEY, Collector, Module, wait_until

RESULTS, ERRORS = "em/results", "em/errors"
FAST_DRAIN = ("Metering:MaxDelaySeconds=0.2", "Metering:MaxBackoffSeconds=1",
              "Metering:TimeoutSeconds=2")


def publish_digits(collector: Collector, n: int, prefix: str = "m") -> None:
    from simulator.datasets import digits_split

    _, x_test, _, _ = digits_split()
    for i in range(n):
        body = {"id": f"{prefix}{i}", "tensor": x_test[i % len(x_test)].reshape(1, 8, 8)
                .tolist()}
        collector.publish(f"em/in/{prefix}", json.dumps(body).encode())


def billed(billing: BillingSimulator) -> int:
    return int(billing.totals()["records"])


def test_usage_records_have_the_azure_shape_and_no_customer_data(
    start_module: Callable[..., Module], collector: Collector, billing: BillingSimulator
) -> None:
    module = start_module(*FAST_DRAIN, billing=billing.url)
    secret_marker = "customer-secret-7f3a"
    from simulator.datasets import digits_split

    _, x_test, _, _ = digits_split()
    for i in range(5):
        body = {"id": f"{secret_marker}-{i}",
                "items": [{"tensor": x_test[i].reshape(1, 8, 8).tolist()}] * (i + 1)}
        collector.publish(f"em/in/{secret_marker}", json.dumps(body).encode())
    collector.wait(RESULTS, 5)
    wait_until(lambda: billed(billing) == 5, 20, "5 records billed")
    records = billing.store.records()
    container_ids = {r["containerId"] for r in records}
    assert len(container_ids) == 1
    assert container_ids == {(module.workdir / "data" / "container-id").read_text().strip()}
    assert sorted(r["meter"]["quantity"] for r in records) == [1, 2, 3, 4, 5]
    for record in records:
        assert set(record) == {"id", "containerType", "containerVersion", "containerId",
                               "meter", "requestTime", "apiType"}
        assert record["containerType"] == "edge-module"
        assert record["meter"]["name"] == "digits.image.classify"
        assert record["apiType"] == "image-classification"
        assert abs(record["requestTime"] / 1000 - time.time()) < 120
    # Nothing of the input reaches the billing endpoint, nor the ledger file.
    assert secret_marker not in json.dumps(records)
    ledger_bytes = b"".join(p.read_bytes() for p in (module.workdir / "data").glob("ledger*"))
    assert secret_marker.encode() not in ledger_bytes
    assert API_KEY.encode() not in ledger_bytes


def test_offline_backlog_drains_exactly_once_when_the_link_returns(
    start_module: Callable[..., Module], collector: Collector, billing: BillingSimulator,
    proxy: FaultProxy,
) -> None:
    module = start_module(*FAST_DRAIN, billing=proxy.url)  # online first: a lease for grace
    proxy.cut()
    publish_digits(collector, 60, "off")
    results = collector.wait(RESULTS, 60)
    assert len({r["id"] for r in results}) == 60
    wait_until(lambda: module.metric("edge_module_ledger_pending_records") == 60, 10,
               "60 pending")
    assert billed(billing) == 0
    assert module.metric("edge_module_ledger_oldest_pending_age_seconds") > 0
    # Offline, the uploader backs off (cap 1 s here) instead of spinning.
    failures = 'status="CouldNotConnect"'
    before = module.metric("edge_module_drain_failures_total", failures)
    time.sleep(3)
    tries = module.metric("edge_module_drain_failures_total", failures) - before
    assert 1 <= tries <= 30, f"{tries} upload attempts in 3 s while offline"
    proxy.restore()
    wait_until(lambda: module.metric("edge_module_ledger_pending_records") == 0, 30,
               "backlog drained")
    assert billed(billing) == 60
    assert module.metric("edge_module_drain_acknowledged_records_total") == 60
    assert module.metric("edge_module_drain_last_success_timestamp_seconds") > 0


def test_lost_answers_are_resent_and_counted_once_as_duplicates(
    start_module: Callable[..., Module], collector: Collector, billing: BillingSimulator
) -> None:
    billing.set_fault("drop")  # commits the usage, then drops the answer
    module = start_module(*FAST_DRAIN, billing=billing.url)
    publish_digits(collector, 20, "drop")
    collector.wait(RESULTS, 20)
    wait_until(lambda: billed(billing) == 20, 20, "usage committed by the endpoint")
    assert module.metric("edge_module_ledger_pending_records") == 20  # answers were lost
    billing.set_fault("none")
    wait_until(lambda: module.metric("edge_module_ledger_pending_records") == 0, 30,
               "resent and acknowledged")
    assert billed(billing) == 20
    assert module.metric("edge_module_drain_duplicate_records_total") == 20
    assert billing.totals()["duplicates"] >= 20  # every resend while answers were dropped


def test_retry_after_is_honoured(
    start_module: Callable[..., Module], collector: Collector, billing: BillingSimulator
) -> None:
    start_module(*FAST_DRAIN, billing=billing.url)
    billing.set_fault("busy", retry_after=3)
    publish_digits(collector, 5, "busy")
    collector.wait(RESULTS, 5)
    wait_until(lambda: len(billing.calls()) >= 1, 20, "a first upload")
    first = billing.calls()[0][0]
    assert billing.calls()[0][1] == "busy"
    time.sleep(1.0)
    billing.set_fault("none")
    wait_until(lambda: billed(billing) == 5, 20, "upload after Retry-After")
    # The simulator stores records before it logs the call: wait for the log too.
    wait_until(lambda: len(billing.calls()) >= 2, 5, "the second call logged")
    calls = billing.calls()
    assert calls[0][1] == "busy"
    second = calls[1][0]
    assert second - first >= 3.0, f"retried after {second - first:.2f}s, Retry-After was 3"


def test_blackholed_endpoint_does_not_stall_inference(
    start_module: Callable[..., Module], collector: Collector, billing: BillingSimulator,
    proxy: FaultProxy,
) -> None:
    module = start_module("Metering:MaxDelaySeconds=0.2", "Metering:TimeoutSeconds=30",
                          billing=proxy.url)
    proxy.blackhole()
    publish_digits(collector, 10, "bh1")
    collector.wait(RESULTS, 10)
    wait_until(lambda: proxy.accepted >= 1, 10, "an upload reaching the blackhole")
    # The upload is hanging inside its 30 s timeout; inference goes on regardless.
    publish_digits(collector, 100, "bh2")
    assert len(collector.wait(RESULTS, 110, timeout=20)) == 110
    assert module.metric("edge_module_drain_failures_total",
                         'status="CouldNotConnect"') == 0  # still waiting: not failed yet
    assert billed(billing) == 0
    proxy.restore()
    wait_until(lambda: billed(billing) == 110, 60, "drained after the link returned")


def test_buffer_full_refuses_work_then_recovers_after_the_drain(
    start_module: Callable[..., Module], collector: Collector, billing: BillingSimulator,
    proxy: FaultProxy,
) -> None:
    module = start_module(*FAST_DRAIN, "Metering:MaxPendingRecords=20", billing=proxy.url)
    proxy.cut()
    publish_digits(collector, 30, "cap")
    collector.wait(RESULTS, 20)
    errors = collector.wait(ERRORS, 10)
    assert {e["error"]["code"] for e in errors} == {"MeteringBufferFull"}
    assert len(collector.on(RESULTS)) == 20
    assert module.metric("edge_module_ledger_fill_ratio") >= 1.0
    assert '"metering_buffer_high"' in module.log_text()  # the 80% warning
    assert module.metric("edge_module_errors_total", 'code="MeteringBufferFull"') == 10
    proxy.restore()
    wait_until(lambda: module.metric("edge_module_ledger_pending_records") == 0, 30,
               "drained")
    publish_digits(collector, 5, "after")
    assert len(collector.wait(RESULTS, 25)) == 25
    wait_until(lambda: billed(billing) == 25, 20, "all 25 billed")


def test_corrupt_ledger_is_moved_aside_and_service_continues(
    start_module: Callable[..., Module], collector: Collector, billing: BillingSimulator,
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    garbage = b"SQLite format 3\x00" + b"\xde\xad\xbe\xef" * 4096
    (data / "ledger.db").write_bytes(garbage)
    module = start_module(*FAST_DRAIN, billing=billing.url)
    moved = list(data.glob("ledger.db.corrupt-*"))
    assert len(moved) == 1 and moved[0].read_bytes() == garbage
    assert '"ledger_corrupt_moved_aside"' in module.log_text()
    publish_digits(collector, 5, "fresh")
    collector.wait(RESULTS, 5)
    wait_until(lambda: billed(billing) == 5, 20, "billing from the fresh ledger")


def test_kill_9_loop_bills_exactly_the_answers_delivered(
    start_module: Callable[..., Module], collector: Collector, billing: BillingSimulator,
    tmp_path: Path,
) -> None:
    """20+ kill -9 at random moments, during inference and during uploads."""
    import random
    import threading

    rng = random.Random(1234)
    total = 600
    stop = threading.Event()

    def feed() -> None:
        from simulator.datasets import digits_split

        _, x_test, _, _ = digits_split()
        for i in range(total):
            if stop.is_set():
                return
            body = {"id": f"k{i}", "tensor": x_test[i % len(x_test)].reshape(1, 8, 8).tolist()}
            collector.publish("em/in/kill", json.dumps(body).encode())
            time.sleep(0.01)

    publisher = threading.Thread(target=feed, daemon=True)
    settings = ("Metering:MaxDelaySeconds=0.05", "Metering:BatchSize=25",
                "Metering:MaxBackoffSeconds=0.5", "Metering:TimeoutSeconds=2")
    module = start_module(*settings, billing=billing.url)
    publisher.start()
    kills = 0
    try:
        while kills < 22:
            # Half the time the endpoint is slow or drops answers, so kills land mid-upload.
            billing.set_fault(rng.choice(["none", "slow", "drop", "none"]), delay_seconds=0.3)
            time.sleep(rng.uniform(0.1, 1.2))
            module.signal(signal.SIGKILL)
            module.wait_exit()
            kills += 1
            module.start()
        billing.set_fault("none")
        publisher.join(60)
        assert not publisher.is_alive()
        wait_until(lambda: len({r["id"] for r in collector.json(RESULTS)}) == total, 90,
                   "every input answered")
        wait_until(lambda: module.metric("edge_module_ledger_pending_records") == 0, 60,
                   "backlog drained")
    finally:
        stop.set()
    answered = {r["id"] for r in collector.json(RESULTS)}
    assert answered == {f"k{i}" for i in range(total)}
    assert collector.on(ERRORS) == []
    assert billed(billing) == len(answered), (
        f"billed {billed(billing)} for {len(answered)} answers after {kills} kills")
    assert kills >= 20


def test_quarantine_and_poison_records_never_block_the_rest(
    billing: BillingSimulator, tmp_path: Path
) -> None:
    from edge_module.billing_api import BillingClient
    from edge_module.config import MeteringSettings
    from edge_module.metering.drain import Drainer
    from edge_module.metering.ledger import Ledger
    from edge_module.metering.records import Identity, MeterSpec, Usage

    settings = MeteringSettings(BatchSize=10)
    ledger = Ledger(tmp_path / "ledger.db", Identity("edge-module", "0.1.0", "c-1"), settings)
    good = ledger.append(MeterSpec("good.meter", "t"), [Usage(1)] * 12)
    bad = ledger.append(MeterSpec("bad.meter", "t"), [Usage(1)] * 3)
    poison = ledger.append(MeterSpec("good.meter", "t"), [Usage(2)])
    billing.state.reject_meters["bad.meter"] = "UnknownMeter"
    billing.state.bad_request_ids.add(poison[0])
    drainer = Drainer(ledger, BillingClient(billing.url, API_KEY, timeout=5), settings)
    outcome = drainer.drain_all(time.monotonic() + 30)
    assert ledger.pending == 0
    stats = ledger.stats()
    assert stats.accepted == 12 and stats.quarantined == 4
    reasons = {q["id"]: q["reason"] for q in ledger.quarantined()}
    assert {reasons[i] for i in bad} == {"UnknownMeter"}
    assert reasons[poison[0]].startswith("HTTP 400")
    assert {r["id"] for r in billing.store.records()} == set(good)
    assert outcome.quarantined == 4
    # Quarantined records are not retried.
    calls = len(billing.calls())
    drainer.drain_all(time.monotonic() + 5)
    assert len(billing.calls()) == calls
    ledger.close()


def test_redelivery_after_a_crash_is_recognised_as_a_replay(tmp_path: Path) -> None:
    from edge_module.config import MeteringSettings
    from edge_module.metering.ledger import Ledger
    from edge_module.metering.records import Identity, MeterSpec, Usage

    path = tmp_path / "ledger.db"
    ledger = Ledger(path, Identity("edge-module", "0.1.0", "c-1"), MeteringSettings())
    (rid,) = ledger.append(MeterSpec("m", "t"), [Usage(1, "17", b"digest-a")])
    ledger.close()
    reopened = Ledger(path, Identity("edge-module", "0.1.0", "c-1"), MeteringSettings())
    assert reopened.replayed("17", b"digest-a") == rid
    assert reopened.replayed("17", b"digest-b") is None  # packet id reused for a new input
    assert reopened.replayed("18", b"digest-a") is None
    reopened.append(MeterSpec("m", "t"), [Usage(1, "17", b"digest-b")])
    assert reopened.replayed("17", b"digest-a") is None
    assert reopened.pending == 2
    rows = sqlite3.connect(path).execute("SELECT name FROM _migrations").fetchall()
    assert rows == [("0001_initial",)]
    reopened.close()


def test_acknowledged_records_are_pruned_after_retention_quarantined_kept(
    tmp_path: Path
) -> None:
    from edge_module.config import MeteringSettings
    from edge_module.metering.ledger import ACCEPTED, Ledger
    from edge_module.metering.records import Identity, MeterSpec, Usage

    ledger = Ledger(tmp_path / "l.db", Identity("edge-module", "0.1.0", "c"),
                    MeteringSettings(RetentionHours=0))
    ledger.append(MeterSpec("m", "t"), [Usage(1)] * 4)
    batch = ledger.pending_batch(10)
    ledger.settle([(r.seq, ACCEPTED) for r in batch[:3]], quarantined=[(batch[3].seq, "X")])
    time.sleep(0.01)
    assert ledger.prune() == 3
    stats = ledger.stats()
    assert (stats.accepted, stats.quarantined, stats.pending) == (0, 1, 0)
    ledger.close()


def test_ledger_cli_shows_the_backlog_and_drains_it(
    billing: BillingSimulator, tmp_path: Path
) -> None:
    from edge_module.config import MeteringSettings
    from edge_module.metering.ledger import Ledger
    from edge_module.metering.records import Identity, MeterSpec, Usage
    from edge_module.state import installation_id

    data = tmp_path / "data"
    data.mkdir()
    identity = Identity("edge-module", "0.1.0", installation_id(data))
    ledger = Ledger(data / "ledger.db", identity, MeteringSettings())
    ledger.append(MeterSpec("m", "t"), [Usage(1)] * 1200)
    ledger.close()
    base = [sys.executable, "-m", "edge_module", "ledger", f"Data:Path={data}"]
    shown = subprocess.run([*base, "--json"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["pending"] == 1200
    drained = subprocess.run([*base, "--drain", "--json", "Eula=accept",
                              f"Billing={billing.url}", f"ApiKey={API_KEY}"],
                             capture_output=True, text=True, timeout=60)
    assert drained.returncode == 0, drained.stderr
    report = json.loads(drained.stdout)
    assert report["uploaded"] == 1200 and report["remaining"] == 0
    assert "uploaded 1200/1200" in drained.stderr  # the progress display
    assert billed(billing) == 1200
    assert API_KEY not in drained.stdout + drained.stderr
    wrong = subprocess.run([*base, "--drain", "Eula=accept", f"Billing={billing.url}",
                            "ApiKey=nope-not-a-known-key"], capture_output=True, text=True,
                           timeout=60)
    assert wrong.returncode == 0  # nothing left to drain


_ = (subprocess, sys)


def test_fault_proxy_refuses_while_cut_and_keeps_its_port() -> None:
    import socket

    upstream = socket.socket()
    upstream.bind(("127.0.0.1", 0))
    upstream.listen()
    proxy = FaultProxy(upstream.getsockname()[1]).start()
    try:
        for _ in range(10):
            proxy.cut()
            try:
                socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
                raise AssertionError("connected while cut")
            except ConnectionRefusedError:
                pass
            proxy.restore()
            socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
    finally:
        proxy.stop()
        upstream.close()


def test_salvage_copies_pending_records_of_a_moved_aside_ledger(
    billing: BillingSimulator, tmp_path: Path
) -> None:
    from edge_module.config import MeteringSettings
    from edge_module.metering.ledger import ACCEPTED, Ledger
    from edge_module.metering.records import Identity, MeterSpec, Usage

    identity = Identity("edge-module", "0.1.0", "c-1")
    old = Ledger(tmp_path / "old.db", identity, MeteringSettings())
    ids = old.append(MeterSpec("m", "t"), [Usage(1)] * 10)
    first = old.pending_batch(3)
    old.settle([(r.seq, ACCEPTED) for r in first])  # 3 already delivered
    old.close()
    fresh = Ledger(tmp_path / "ledger.db", identity, MeteringSettings())
    copied, _ = fresh.salvage(tmp_path / "old.db")
    assert copied == 7 and fresh.pending == 7
    assert {r.id for r in fresh.pending_batch(100)} == set(ids[3:])
    assert fresh.salvage(tmp_path / "old.db")[0] == 0  # twice changes nothing
    fresh.close()
