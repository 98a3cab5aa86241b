"""The ledger's transaction rules, the bounded WAL, the lease store and the supervisor
against a real full disk (a tmpfs mounted by the test), in-process and quick."""

from __future__ import annotations

import io
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_module import logs
from edge_module.billing_api import BillingClient
from edge_module.config import MeteringSettings
from edge_module.identity import Identity
from edge_module.licensing.lease import Lease, LeaseStore
from edge_module.metering.drain import Drainer
from edge_module.metering.ledger import WAL_LIMIT_BYTES, Ledger, MeteringError
from edge_module.metering.records import MeterSpec, Usage
from edge_module.metering.transaction import disk_full, write_transaction
from edge_module.metrics import Metrics
from simulator.billing import BillingSimulator, KeyInfo
from tests.diskfull import Ballast, mounted_tmpfs
from tests.support import API_KEY, simulator_keys, wait_until

METER = MeterSpec("digits.image.classify", "image-classification")
IDENTITY = Identity("edge-module", "1.0.0", "00000000-0000-4000-8000-000000000001")


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "volume", "3m") as where:
        yield where


def ledger_on(folder: Path, **settings: object) -> Ledger:
    return Ledger(folder / "ledger.db", IDENTITY,
                  MeteringSettings.model_validate({"MaxPendingRecords": 300, **settings}))


def usages(n: int, key: str = "") -> list[Usage]:
    return [Usage(1, f"{key}{i}" if key else None, b"d" if key else None) for i in range(n)]


# -- the transaction helper -------------------------------------------------


def test_a_failed_body_is_rolled_back_and_on_failure_runs(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    conn.execute("CREATE TABLE t (x INTEGER)")
    failures: list[int] = []
    with pytest.raises(ValueError, match="boom"), \
            write_transaction(conn, lambda: failures.append(1)):
        conn.execute("INSERT INTO t VALUES (1)")
        raise ValueError("boom")
    assert failures == [1]
    assert not conn.in_transaction
    assert conn.execute("SELECT count(*) FROM t").fetchone() == (0,)
    with write_transaction(conn):
        conn.execute("INSERT INTO t VALUES (2)")
    assert conn.execute("SELECT x FROM t").fetchall() == [(2,)]


def test_when_sqlite_already_rolled_back_the_real_cause_is_raised(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    conn.execute("CREATE TABLE t (x INTEGER)")
    with pytest.raises(sqlite3.OperationalError, match="the real cause"), \
            write_transaction(conn):
        conn.execute("ROLLBACK")  # what SQLite does by itself on SQLITE_FULL at COMMIT
        raise sqlite3.OperationalError("the real cause")  # not "cannot rollback"
    assert not conn.in_transaction


def test_first_commit_on_a_full_disk_does_not_poison_a_fresh_ledger(volume: Path) -> None:
    ledger = ledger_on(volume)
    ballast = Ballast(volume)
    ballast.fill()
    assert ledger.admit(5) == 5
    with pytest.raises(MeteringError, match="database or disk is full") as failed:
        ledger.append(METER, usages(5, "a"))
    assert "rollback" not in str(failed.value)
    assert disk_full(failed.value.__cause__ or failed.value)
    assert ledger.health() is not None and "disk" in str(ledger.health())
    assert ledger.pending == 0
    assert ledger.probe() is not None  # still full: the probe fails too
    ballast.remove()
    time.sleep(1.05)  # probes are rate-limited to one a second
    assert ledger.probe() is None
    # The meter id cached by the rolled-back transaction is gone: no FOREIGN KEY error.
    assert ledger.admit(3) == 3
    assert len(ledger.append(METER, usages(3, "b"))) == 3
    assert ledger.pending == 3
    # Admission is back to exactly MaxPendingRecords: nothing leaked.
    assert ledger.admit(1000) == 300 - 3


def test_failures_mid_run_never_leak_admission(volume: Path) -> None:
    ledger = ledger_on(volume)
    assert ledger.admit(10) == 10
    ledger.append(METER, usages(10, "ok"))
    ballast = Ballast(volume)
    ballast.fill()
    failures = 0
    for round_ in range(30):
        assert ledger.admit(4) == 4
        try:
            ledger.append(METER, usages(4, f"r{round_}-"))
        except MeteringError as exc:
            assert "database or disk is full" in str(exc)
            failures += 1
    assert failures == 30
    ballast.remove()
    assert ledger.admit(1000) == 300 - 10  # every failed commit gave its room back
    ledger.release(300 - 10)
    assert ledger.admit(2) == 2
    ledger.append(METER, usages(2, "after"))
    assert ledger.pending == 12
    assert ledger.stats().pending == 12


def test_the_wal_stays_bounded_and_a_checkpoint_truncates_it(volume: Path) -> None:
    # SQLite's default checkpoint (1000 pages, 4 MiB of WAL) filled a 3 MB volume
    # after ~290 single-record commits.
    ledger = ledger_on(volume, MaxPendingRecords=10_000)
    wal = volume / "ledger.db-wal"
    biggest = 0
    for i in range(1500):
        assert ledger.admit(1) == 1
        ledger.append(METER, usages(1, f"w{i}-"))
        biggest = max(biggest, wal.stat().st_size)
    assert biggest <= WAL_LIMIT_BYTES + 64 * 1024
    ledger.settle([(r.seq, 1) for r in ledger.pending_batch(1500)])
    assert ledger.pending == 0
    assert ledger.checkpoint()
    assert wal.stat().st_size == 0
    assert ledger.stats().file_bytes < 2 * 1024 * 1024  # the db, its WAL and -shm


def test_max_ledger_mb_counts_the_wal(volume: Path) -> None:
    cap = 0.25 * 1024 * 1024
    ledger = ledger_on(volume, MaxLedgerMb=0.25, MaxPendingRecords=100_000)
    for i in range(3000):
        ledger._bytes_checked = 0.0  # re-read the file sizes at every admission
        if ledger.admit(1) == 0:
            break
        ledger.append(METER, usages(1, f"m{i}-"))
    else:
        raise AssertionError("3000 records never reached a 0.25 MB cap")
    database = (volume / "ledger.db").stat().st_size
    total = sum(p.stat().st_size for p in volume.glob("ledger.db*"))
    assert database < cap <= total  # the WAL and -shm are what reached the cap


# -- the lease store and the uploader ------------------------------------------


def test_a_lease_write_on_a_full_disk_is_logged_and_the_old_file_kept(
        volume: Path) -> None:
    lines = io.StringIO()
    logs.configure("info", "json", stream=lines)  # earlier tests may have bound another stream
    store = LeaseStore(volume / "lease.json")
    old = Lease("c", "edge-module", "Valid", 1, 2, "k", {"old": True})
    assert store.save(old)
    ballast = Ballast(volume)
    ballast.fill()
    new = Lease("c", "edge-module", "Valid", 3, 4, "k", {"new": "x" * 8000})
    assert store.save(new) is False  # no exception reaches the caller
    assert '"event": "lease_save_failed"' in lines.getvalue()
    assert (volume / "lease.json").read_text() == '{"old": true}'
    assert not (volume / "lease.tmp").exists()
    ballast.remove()
    assert store.save(new)


def test_the_drain_thread_survives_a_full_disk_while_settling(volume: Path,
                                                              tmp_path: Path) -> None:
    sim = BillingSimulator(tmp_path / "billing.db", keys={API_KEY: KeyInfo()}).start()
    ledger = ledger_on(volume, MaxDelaySeconds=0.1, MaxBackoffSeconds=0.5)
    store = LeaseStore(volume / "lease.json")
    lease = Lease("c", "edge-module", "Valid", 1, 2, "k", {"x": 1})
    saves: list[bool] = []
    drainer = Drainer(ledger, BillingClient(sim.url, API_KEY, timeout=5), ledger.settings,
                      Metrics(), on_answer=lambda _: saves.append(store.save(lease)),
                      keys=simulator_keys(sim.public_key_b64))
    try:
        assert ledger.admit(20) == 20
        ids = ledger.append(METER, usages(20, "d"))
        ballast = Ballast(volume)
        ballast.fill()
        drainer.start()
        # The endpoint takes the records, but neither the lease nor the settle can be
        # written: the thread logs, backs off and sends again.
        wait_until(lambda: len(saves) >= 2, 15, "two uploads while the disk is full")
        assert sim.totals()["records"] == 20
        assert ledger.pending == 20 and not any(saves)
        assert drainer._thread is not None and drainer._thread.is_alive()
        ballast.remove()
        wait_until(lambda: ledger.pending == 0, 15, "the backlog settled after space returned")
        assert sim.totals()["records"] == 20  # resends answered Duplicate, billed once
        assert {r["id"] for r in sim.store.records()} == set(ids)
        assert saves[-1] is True
    finally:
        drainer.stop()
        sim.stop()
