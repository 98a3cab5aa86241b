"""A full disk under ``Data:Path``, end to end: the module as a process, a real mosquitto,
the billing simulator, and a 3 MB tmpfs that the test fills (a ballast file) and empties.

One module process goes through every case in turn, so each later case also proves
that the earlier one healed by itself: (a) the first commit of a fresh ledger, (b) a
disk that fills while inputs stream in, (c) a drain whose settle (and lease write)
hits the full disk while the simulator answers, (d) a status check whose lease write
fails. Afterwards: serving and draining without a restart, admission exactly
``Metering:MaxPendingRecords``, billed == results delivered.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

from simulator.billing import BillingSimulator
from tests.diskfull import Ballast, mounted_tmpfs
from tests.support import Broker, Collector, Module, wait_until

RESULTS, ERRORS = "em/results", "em/errors"
FAST_DRAIN = ("Metering:MaxDelaySeconds=0.2", "Metering:MaxBackoffSeconds=1",
              "Metering:TimeoutSeconds=2")
CAP = 200  # Metering:MaxPendingRecords


def send(collector: Collector, ids: list[str], gap: float = 0.0) -> None:
    from simulator.datasets import digits_split

    _, x_test, _, _ = digits_split()
    for i, rid in enumerate(ids):
        body = {"id": rid, "tensor": x_test[i % len(x_test)].reshape(1, 8, 8).tolist()}
        collector.publish("em/in/disk", json.dumps(body).encode())
        if gap:
            time.sleep(gap)


def answers(collector: Collector, prefix: str) -> tuple[set[str], dict[str, str]]:
    results = {r["id"] for r in collector.json(RESULTS) if r["id"].startswith(prefix)}
    errors = {e["id"]: e["error"]["code"] for e in collector.json(ERRORS)
              if e["id"].startswith(prefix)}
    return results, errors


def wait_answered(collector: Collector, prefix: str, count: int,
                  timeout: float = 20) -> tuple[set[str], dict[str, str]]:
    wait_until(lambda: sum(map(len, answers(collector, prefix))) >= count, timeout,
               f"{count} answers to {prefix}*")
    results, errors = answers(collector, prefix)
    assert not results & set(errors), "an input got both a result and an error"
    assert len(results) + len(errors) == count
    return results, errors


def ready(module: Module) -> tuple[bool, str]:
    status, body = module.http("/ready")
    reason = json.loads(body).get("reason", "") if body else ""
    return status == 200, str(reason)


def test_a_disk_that_fills_and_empties_heals_without_a_restart(
    tmp_path: Path, start_module: Callable[..., Module], collector: Collector,
    billing: BillingSimulator,
) -> None:
    with mounted_tmpfs(tmp_path / "data", "3m") as data:
        module = start_module(*FAST_DRAIN, f"Metering:MaxPendingRecords={CAP}")
        ballast = Ballast(data)
        try:
            run_cases(module, collector, billing, ballast, data)
        finally:
            ballast.remove()
            module.stop()


def run_cases(module: Module, collector: Collector, billing: BillingSimulator,
              ballast: Ballast, data: Path) -> None:
    pid = module.process.pid if module.process else None

    # (a) The very first commit of a fresh ledger hits the full disk.
    ballast.fill()
    send(collector, [f"a{i}" for i in range(5)])
    results, errors = wait_answered(collector, "a", 5)
    assert not results and set(errors.values()) == {"MeteringUnavailable"}
    is_ready, reason = ready(module)
    assert not is_ready and "disk" in reason and "full" in reason, reason
    ballast.remove()
    wait_until(lambda: ready(module)[0], 10, "ready again after space returned")
    send(collector, [f"A{i}" for i in range(5)])  # no FOREIGN KEY error from a stale cache
    results, errors = wait_answered(collector, "A", 5)
    assert len(results) == 5, errors

    # (b) The disk fills while inputs stream in, then empties.
    ids = [f"b{i}" for i in range(150)]
    streaming = threading.Thread(target=send, args=(collector, ids, 0.01))
    streaming.start()
    wait_until(lambda: len(answers(collector, "b")[0]) >= 20, 20, "20 results before the fill")
    ballast.fill()
    wait_until(lambda: len(answers(collector, "b")[1]) >= 5, 20, "refusals while full")
    ballast.remove()
    streaming.join(30)
    results, errors = wait_answered(collector, "b", len(ids))
    assert set(errors.values()) == {"MeteringUnavailable"}, errors
    assert len(results) >= 20
    tail = [f"b{i}" for i in range(140, 150)]
    wait_until(lambda: ready(module)[0], 10, "ready again after the mid-run fill")
    assert set(tail) & results, "serving did not resume by itself"

    # (c) A drain whose settle hits the full disk, the simulator answering. (Upload answers
    # bring no lease: only a nonce-bound status answer does; case (d) fills the disk under
    # that lease write.)
    wait_until(lambda: module.metric("edge_module_ledger_pending_records") == 0, 20,
               "the backlog drained")
    billing.set_fault("busy", retry_after=1)
    send(collector, [f"c{i}" for i in range(10)])
    results, _ = wait_answered(collector, "c", 10)
    assert len(results) == 10
    ballast.fill()
    failed_before = module.log_text().count('"drain_loop_error"')
    billing.set_fault("none")
    wait_until(lambda: module.log_text().count('"drain_loop_error"') > failed_before, 20,
               "an upload whose settle failed on the full disk")
    billed_ids = {r["id"] for r in billing.store.records()}
    assert len(billed_ids) >= 10  # the endpoint has them; the ledger could not settle them
    assert not ready(module)[0]
    ballast.remove()
    wait_until(lambda: module.metric("edge_module_ledger_pending_records") == 0, 20,
               "the drain settled after space returned")
    wait_until(lambda: ready(module)[0], 10, "ready again after the drain")

    # (d) A lease write fails during a status check: /status still answers.
    lease_file = data / "lease.json"
    before = lease_file.read_bytes()
    ballast.fill()
    leases_before = module.log_text().count('"lease_save_failed"')
    time.sleep(1.1)  # /status reuses an answer up to 1 s old
    status, body = module.http("/status")
    assert status == 200, body
    wait_until(lambda: module.log_text().count('"lease_save_failed"') > leases_before, 5,
               "the failed lease write logged")
    assert lease_file.read_bytes() == before  # the old lease is whole, not truncated
    ballast.remove()
    time.sleep(1.1)
    assert module.http("/status")[0] == 200
    wait_until(lambda: lease_file.read_bytes() != before, 5, "the new lease stored")
    json.loads(lease_file.read_bytes())

    # After all of it: the same process, admission exactly the cap, billed == delivered.
    assert module.process is not None and module.process.pid == pid
    assert module.process.poll() is None
    wait_until(lambda: module.metric("edge_module_ledger_pending_records") == 0, 20,
               "nothing pending")
    billing.set_fault("busy", retry_after=30)
    time.sleep(0.5)  # let an upload in flight finish
    send(collector, [f"z{i}" for i in range(CAP + 5)])
    results, errors = wait_answered(collector, "z", CAP + 5, timeout=30)
    assert len(results) == CAP, f"admission is {len(results)}, not {CAP}"
    assert set(errors.values()) == {"MeteringBufferFull"}
    billing.set_fault("none")
    module.http("/status")  # a Valid answer wakes the uploader at once
    wait_until(lambda: module.metric("edge_module_ledger_pending_records") == 0, 30,
               "the final backlog drained")
    delivered = {r["id"] for r in collector.json(RESULTS)}
    assert len(delivered) == len(collector.json(RESULTS))  # none answered twice
    assert int(billing.totals()["records"]) == len(delivered)
    assert ready(module)[0]
    assert '"thread_died"' not in module.log_text()
    assert "cannot rollback" not in module.log_text()
    assert "FOREIGN KEY" not in module.log_text()


def test_a_start_on_a_full_disk_fails_in_one_line_and_never_moves_the_ledger_aside(
    tmp_path: Path, broker: Broker, billing: BillingSimulator,
) -> None:
    from edge_module import CONTAINER_TYPE, __version__
    from edge_module.config import MeteringSettings
    from edge_module.identity import Identity
    from edge_module.metering.ledger import Ledger
    from edge_module.metering.records import MeterSpec, Usage

    def start_expecting_exit(expected: str) -> None:
        module = Module(tmp_path, broker.port, *FAST_DRAIN, billing=billing.url,
                        public_key=billing.public_key_b64)
        module.start(wait_ready=False)
        try:
            assert module.wait_exit(30) == 2, module.log_tail()
        finally:
            module.stop()
        text = module.log_text()
        assert "configuration error: Data:Path:" in text and expected in text, text
        assert "free space under Data:Path" in text
        assert "Traceback" not in text

    with mounted_tmpfs(tmp_path / "data", "1m") as data:
        ballast = Ballast(data)
        # A first start: the installation id cannot be written.
        ballast.fill()
        start_expecting_exit("No space left on device")
        ballast.remove()
        # A restart of an installation with records waiting: SQLite cannot even open
        # the ledger (no room for its -shm file). It stops; it must not take the
        # ledger for corrupt and move it aside.
        container_id = "00000000-0000-4000-8000-00000000000a"
        (data / "container-id").write_text(container_id + "\n")
        ledger = Ledger(data / "ledger.db", Identity(CONTAINER_TYPE, __version__, container_id),
                        MeteringSettings())
        ledger.admit(3)
        ids = ledger.append(MeterSpec("digits.image.classify", "image-classification"),
                            [Usage(1, None, None)] * 3)
        ledger.close()
        ballast.fill()
        start_expecting_exit("cannot open the ledger")
        assert not list(data.glob("ledger.db.corrupt-*"))
        ballast.remove()
        # Space is back: the same ledger opens and its records are billed.
        module = Module(tmp_path, broker.port, *FAST_DRAIN, billing=billing.url,
                        public_key=billing.public_key_b64)
        module.start()
        try:
            wait_until(lambda: {r["id"] for r in billing.store.records()} == set(ids), 20,
                       "the waiting records billed")
        finally:
            module.stop()
