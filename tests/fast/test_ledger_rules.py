"""The ledger's rules on a real SQLite file: admission, settling, replays, pruning."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from edge_module.identity import Identity
from edge_module.metering.ledger import ACCEPTED, DUPLICATE, MIGRATIONS, Ledger
from edge_module.metering.records import RECORD_FIELDS, MeterSpec, RecordWriter, Usage
from tests.fast.conftest import IDENTITY, make_ledger

METER = MeterSpec("digits.image.classify", "image-classification")


def test_admission_reserves_room_and_release_gives_it_back(tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path / "l.db", MaxPendingRecords=10)
    assert ledger.admit(7) == 7
    assert ledger.admit(7) == 3  # 7 reserved, not yet committed, count already
    assert ledger.admit(1) == 0
    ledger.release(3)
    assert ledger.admit(5) == 3
    ledger.release(10)
    assert ledger.admit(10) == 10
    ledger.close()


def test_a_commit_turns_reservations_into_pending_records(tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path / "l.db", MaxPendingRecords=4)
    assert ledger.admit(4) == 4
    ids = ledger.append(METER, [Usage(1) for _ in range(4)])
    assert len(set(ids)) == 4 and ledger.pending == 4
    assert ledger.admit(1) == 0
    assert ledger.buffer_full().code == "MeteringBufferFull"
    ledger.close()


def test_pending_records_are_the_wire_format_of_records_py(ledger: Ledger) -> None:
    ledger.admit(2)
    ids = ledger.append(METER, [Usage(3), Usage(1)])
    batch = ledger.pending_batch(10)
    assert [p.id for p in batch] == ids
    for pending in batch:
        body = json.loads(pending.body)
        assert tuple(body) == RECORD_FIELDS
        assert body["containerId"] == IDENTITY.container_id
        assert body["meter"]["name"] == METER.name and body["apiType"] == METER.api_type
    assert [json.loads(p.body)["meter"]["quantity"] for p in batch] == [3, 1]


def test_settling_twice_counts_once_and_quarantine_survives_pruning(
        tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path / "l.db", RetentionHours=0.0001)
    ledger.admit(3)
    ledger.append(METER, [Usage(1), Usage(1), Usage(1)])
    seqs = [p.seq for p in ledger.pending_batch(10)]
    ledger.settle([(seqs[0], ACCEPTED), (seqs[1], DUPLICATE)], [(seqs[2], "rejected")])
    ledger.settle([(seqs[0], ACCEPTED)])  # an answer seen twice
    assert ledger.pending == 0
    stats = ledger.stats()
    assert (stats.accepted, stats.duplicates, stats.quarantined) == (1, 1, 1)
    time.sleep(0.5)  # past the (tiny) retention
    assert ledger.prune() == 2
    assert ledger.stats().quarantined == 1
    assert ledger.quarantined()[0]["reason"] == "rejected"
    ledger.close()


def test_a_delivery_is_a_replay_only_with_the_same_bytes(ledger: Ledger) -> None:
    ledger.admit(1)
    [rid] = ledger.append(METER, [Usage(1, "s:1", b"digest-a")])
    assert ledger.replayed("s:1", b"digest-a") == rid
    assert ledger.replayed("s:1", b"digest-b") is None
    assert ledger.replayed("s:2", b"digest-a") is None


def test_pending_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    ledger = make_ledger(path)
    ledger.admit(2)
    ledger.append(METER, [Usage(1), Usage(1)])
    ledger.close()
    again = make_ledger(path)
    assert again.pending == 2
    again.close()


def test_the_wire_form_escapes_whatever_a_descriptor_or_id_holds() -> None:
    odd = Identity('type "x"', "1.0", "c\\1")
    text = RecordWriter(odd).json('id"1', "v\n2", 'meter "ä"', 3, 1700000000000, "api/τ")
    assert json.loads(text) == {
        "id": 'id"1', "containerType": 'type "x"', "containerVersion": "v\n2",
        "containerId": "c\\1", "meter": {"name": 'meter "ä"', "quantity": 3},
        "requestTime": 1700000000000, "apiType": "api/τ"}
    assert tuple(json.loads(text)) == RECORD_FIELDS


def test_salvage_of_a_damaged_file_copies_what_is_readable_and_counts_the_rest(
        tmp_path: Path) -> None:
    old_path = tmp_path / "old.db"
    old = make_ledger(old_path)
    old.admit(3000)
    ids = old.append(METER, [Usage(1) for _ in range(3000)])
    old.checkpoint()  # everything in the main file, nothing left in the WAL
    old.close()
    page = 4096
    pages = old_path.stat().st_size // page
    with open(old_path, "r+b") as handle:  # garbage over three leaf pages in the middle
        for number in (pages // 2, pages // 2 + 1, pages // 2 + 2):
            handle.seek(number * page)
            handle.write(bytes([0xA5]) * page)
    fresh = make_ledger(tmp_path / "ledger.db")
    copied, unreadable = fresh.salvage(old_path)
    assert unreadable > 0 and copied > 2000
    assert copied + unreadable == 3000
    salvaged = {p.id for p in fresh.pending_batch(3000)}
    assert salvaged <= set(ids) and len(salvaged) == copied
    assert fresh.salvage(old_path) == (0, unreadable)  # again: nothing twice
    fresh.close()


def test_a_reopened_ledger_still_recognises_replays(tmp_path: Path) -> None:
    """After a crash the broker redelivers; the ledger on disk tells replays apart."""
    path = tmp_path / "l.db"
    ledger = make_ledger(path)
    ledger.admit(1)
    (rid,) = ledger.append(METER, [Usage(1, "17", b"digest-a")])
    ledger.close()
    reopened = make_ledger(path)
    assert reopened.replayed("17", b"digest-a") == rid
    reopened.admit(1)
    reopened.append(METER, [Usage(1, "17", b"digest-b")])  # packet id reused for new input
    assert reopened.replayed("17", b"digest-a") is None
    assert reopened.replayed("17", b"digest-b") is not None
    assert reopened.pending == 2
    applied = sqlite3.connect(path).execute("SELECT name FROM _migrations").fetchall()
    assert applied == [(name,) for name, _ in MIGRATIONS]  # each migration once, in order
    reopened.close()


def test_salvage_copies_only_pending_records_and_never_twice(tmp_path: Path) -> None:
    old = make_ledger(tmp_path / "old.db")
    old.admit(10)
    ids = old.append(METER, [Usage(1)] * 10)
    old.settle([(r.seq, ACCEPTED) for r in old.pending_batch(3)])  # 3 already delivered
    old.close()
    fresh = make_ledger(tmp_path / "ledger.db")
    assert fresh.salvage(tmp_path / "old.db") == (7, 0)
    assert fresh.pending == 7
    assert {r.id for r in fresh.pending_batch(100)} == set(ids[3:])
    assert fresh.salvage(tmp_path / "old.db") == (0, 0)
    fresh.close()


def test_every_ledger_write_goes_through_the_transaction_helper() -> None:
    """A hand-written BEGIN/ROLLBACK is how admission leaked and a rollback's error hid
    a full disk: only metering/transaction.py may spell them."""
    root = Path(__file__).resolve().parents[2] / "edge_module"
    offenders = [str(path.relative_to(root)) for path in root.rglob("*.py")
                 if path.name != "transaction.py" and any(
                     word in path.read_text() for word in ('"BEGIN', '"ROLLBACK', '"COMMIT'))]
    assert offenders == []


def test_a_receipt_is_stored_in_the_transaction_that_settles_its_records(
        tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path / "l.db")
    ledger.admit(2)
    ids = ledger.append(METER, [Usage(1), Usage(1)])
    seqs = [p.seq for p in ledger.pending_batch(10)]
    receipt = {"keyId": "k1", "accepted": [ids[0]], "signature": "s"}
    ledger.settle([(seqs[0], ACCEPTED)], retried=[seqs[1]], receipt=receipt)
    assert ledger.receipt_of(ids[0]) == receipt
    assert ledger.receipt_of(ids[1]) is None  # still pending: no receipt claims it
    # A settle that fails rolls the receipt back with it: no receipt without its records.
    ledger._conn.execute("CREATE TRIGGER no_settle BEFORE UPDATE OF state ON records "
                         "BEGIN SELECT RAISE(ABORT, 'refused'); END")
    with pytest.raises(Exception, match="refused"):
        ledger.settle([(seqs[1], ACCEPTED)], receipt={"keyId": "k2", "accepted": [ids[1]]})
    assert ledger.receipt_of(ids[1]) is None and ledger.pending == 1
    count = ledger._conn.execute("SELECT COUNT(*) FROM receipts").fetchone()[0]
    assert count == 1
    ledger.close()


def test_a_named_repeat_is_found_without_scanning_the_records_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The repeat check runs once per named input: it must use an index whatever the
    ledger holds, and a ledger from before deliveries kept their time is migrated."""
    import edge_module.metering.ledger as ledger_module

    path = tmp_path / "l.db"
    monkeypatch.setattr(ledger_module, "MIGRATIONS", MIGRATIONS[:2])  # an older ledger
    old = make_ledger(path)
    old.admit(2)
    ids = old.append(METER, [Usage(1), Usage(1)])
    with old._conn:  # a delivery as the older code wrote it: no time of its own
        old._conn.execute("INSERT INTO deliveries (key, digest, record_id) VALUES (?, ?, ?)",
                          ("id:a", b"d" * 16, ids[0]))
    old.close()
    monkeypatch.setattr(ledger_module, "MIGRATIONS", MIGRATIONS)
    ledger = make_ledger(path)
    assert ledger.replayed("id:a", b"d" * 16, 600_000) == ids[0]  # the time came along
    assert ledger.replayed("id:a", b"e" * 16, 600_000) is None
    plan = [str(row) for row in ledger._conn.execute(
        "EXPLAIN QUERY PLAN " + ledger_module._REPEAT_WITHIN, ("k", b"d", 0, 0))]
    # the key's index finds the row; records are read only for a row from before 0003
    assert "SEARCH d USING INDEX" in plan[0] and not any("SCAN d" in p for p in plan)
    ledger.admit(1)
    ledger.append(METER, [Usage(1, delivery_key="id:b", digest=b"d" * 16)])
    assert ledger._conn.execute("SELECT request_time > 0 FROM deliveries WHERE key = "
                                "'id:b'").fetchone() == (1,)
    ledger.close()


def test_a_repeat_check_does_not_wait_for_a_commit_in_progress(tmp_path: Path) -> None:
    """The inference thread checks named inputs while the commit thread holds the writer
    through its fsync: the check reads the last committed state instead of waiting."""
    import threading

    ledger = make_ledger(tmp_path / "l.db")
    ledger.admit(1)
    first = ledger.append(METER, [Usage(1, delivery_key="id:a", digest=b"d" * 16)])[0]
    found: list[str | None] = []
    with ledger._lock:  # a write transaction in progress on another thread
        reader = threading.Thread(
            target=lambda: found.append(ledger.replayed("id:a", b"d" * 16, 600_000)))
        reader.start()
        reader.join(5)
        assert not reader.is_alive(), "the repeat check waited for the writer"
    assert found == [first]
    ledger.close()


def test_a_wake_cuts_a_back_off_short_but_never_the_endpoints_retry_after(
        tmp_path: Path) -> None:
    """A status check that passes wakes the uploader; an endpoint that answered uploads
    Busy with Retry-After is still left alone for as long as it asked."""
    from edge_module.billing_api import Answer, ApiStatus, BillingClient
    from edge_module.metering.drain import Drainer

    ledger = make_ledger(tmp_path / "l.db")
    drainer = Drainer(ledger, BillingClient("http://127.0.0.1:9", "k" * 20, 1),
                      ledger.settings)
    drainer._schedule_retry(Answer(ApiStatus.BUSY, 503, retry_after=60.0))
    asked = drainer.next_attempt
    drainer.wake()
    assert drainer.next_attempt == asked > time.monotonic() + 50
    drainer._schedule_retry(Answer(ApiStatus.COULD_NOT_CONNECT, None, error="refused"))
    assert drainer.next_attempt > time.monotonic()
    drainer.wake()
    assert drainer.next_attempt == 0.0
    ledger.close()


def test_a_batch_of_repeat_checks_is_one_look_up_with_the_same_answers(tmp_path: Path) -> None:
    """The inference thread checks a batch's named inputs at once: the same answers as
    one check each, the digest and the window still deciding."""
    ledger = make_ledger(tmp_path / "l.db")
    ledger.admit(3)
    ids = ledger.append(METER, [Usage(1, delivery_key=f"id:{n}", digest=bytes([n]) * 16)
                                for n in range(3)])
    asked = [(f"id:{n}", bytes([n]) * 16) for n in range(3)] + [
        ("id:0", b"x" * 16), ("id:9", b"\0" * 16)]  # other bytes, never seen
    found = ledger.replayed_many(asked, 600_000)
    assert found == {(f"id:{n}", bytes([n]) * 16): ids[n] for n in range(3)}
    assert found == {pair: r for pair in asked
                     if (r := ledger.replayed(*pair, 600_000)) is not None}
    ledger.clock_ms = lambda: int(time.time() * 1000) + 700_000  # past the window
    assert ledger.replayed_many(asked, 600_000) == {}
    assert len(ledger.replayed_many(asked)) == 3  # a marked redelivery: any age
    many = [(f"k{n}", b"d" * 16) for n in range(1200)]  # past SQLite's parameter limit
    assert ledger.replayed_many(many, 600_000) == {}
    ledger.close()
