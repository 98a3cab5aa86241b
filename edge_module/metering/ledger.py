"""The ledger: the single source of billing truth, a SQLite file under ``Data:Path``.

* **Durable before visible.** ``append`` commits the records of a batch in one
  transaction (group commit) and returns only then; the pipeline publishes
  results after it returns. WAL mode, ``synchronous=FULL`` by default.
* **Replays are not billed twice.** The same transaction stores, for each
  record, the input delivery it answers (packet id + payload digest). When
  the broker redelivers an input after a crash, ``replayed`` finds its record
  and the pipeline answers again without a new record.
* **Bounded.** Pending records and file size have caps; at a cap ``check``
  raises ``MeteringBufferFull`` (new work is refused, nothing is dropped).
* **Transactions done once, right.** Every write goes through
  ``metering/transaction.py``: a failed transaction (``database or disk is
  full``) is rolled back once, reports its real cause, drops the meter ids it
  cached and always gives back its admission reservations, so the ledger
  works again as soon as the disk has room, without a restart. While writes
  fail, ``health`` names the cause (``/ready`` shows it) and ``probe`` tries a
  tiny write at most once a second to notice the space coming back.
* **Bounded WAL.** The write-ahead log is checkpointed every
  ``WAL_AUTOCHECKPOINT_PAGES`` pages and truncated to ``WAL_LIMIT_BYTES``
  (``journal_size_limit``); the uploader calls ``checkpoint`` (TRUNCATE)
  after drains. ``Metering:MaxLedgerMb`` counts the database, its WAL and its
  shared-memory file.
* **Corruption** found by the integrity check at start moves the file aside
  (never deletes it) and starts a fresh ledger. Only a damaged file counts
  (``SQLITE_CORRUPT``, ``SQLITE_NOTADB``, a failed ``quick_check``); an error of
  the disk (full, I/O) raises ``MeteringError`` and leaves the file alone.

Schema changes are migrations, applied in order and recorded in the
``_migrations`` table (as sqlite-utils users do).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from edge_module.config import MeteringSettings
from edge_module.errors import ErrorCode
from edge_module.exceptions import EdgeModuleError, Refusal
from edge_module.identity import Identity
from edge_module.logs import get_logger
from edge_module.metering.records import MeterSpec, RecordWriter, Usage
from edge_module.metering.transaction import disk_full, write_transaction

log = get_logger("ledger")

_UNKNOWN = object()  # a cache not filled yet
# A delivery's record within a window: found by the key's index; a row from before
# migration 0003 (request_time 0) reads its time from the record it names.
_REPEAT_WITHIN = (
    "SELECT d.record_id FROM deliveries d WHERE d.key = ? AND d.digest = ? AND "
    "(d.request_time >= ? OR (d.request_time = 0 AND EXISTS (SELECT 1 FROM records r "
    "WHERE r.id = d.record_id AND r.request_time >= ?)))")
PENDING, ACCEPTED, DUPLICATE, QUARANTINED = 0, 1, 2, 3
STATE_NAMES = {PENDING: "pending", ACCEPTED: "accepted", DUPLICATE: "duplicate",
               QUARANTINED: "quarantined"}
WARN_RATIO = 0.8
WAL_LIMIT_BYTES = 1024 * 1024  # journal_size_limit: the WAL is cut back to this
WAL_AUTOCHECKPOINT_PAGES = 256  # 1 MiB of 4 KiB pages (SQLite's default, 1000, is 4 MiB)
PROBE_INTERVAL = 1.0  # seconds between write probes while writes fail
# Errors that mean the file itself is damaged (moved aside); any other error at open
# (SQLITE_FULL, SQLITE_IOERR, SQLITE_CANTOPEN...) is the disk's and stops the start.
CORRUPTION_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}

MIGRATIONS: list[tuple[str, str]] = [
    ("0001_initial", """
        CREATE TABLE meters (
            meter_id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            api_type TEXT NOT NULL,
            container_version TEXT NOT NULL,
            UNIQUE (name, api_type, container_version)
        );
        CREATE TABLE records (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL,
            meter_id INTEGER NOT NULL REFERENCES meters(meter_id),
            quantity INTEGER NOT NULL,
            request_time INTEGER NOT NULL,
            state INTEGER NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0,
            settled_at INTEGER,
            reason TEXT
        );
        CREATE INDEX records_pending ON records (seq) WHERE state = 0;
        CREATE INDEX records_settled ON records (settled_at) WHERE state IN (1, 2);
        CREATE TABLE deliveries (
            key TEXT PRIMARY KEY,
            digest BLOB NOT NULL,
            record_id TEXT NOT NULL
        );
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """),
    # Signed usage receipts (metering/receipts.py): a record settles only under one, and
    # keeps it for the retention period, so an audit can prove delivery.
    ("0002_receipts", """
        CREATE TABLE receipts (
            receipt_id INTEGER PRIMARY KEY AUTOINCREMENT,
            received_at INTEGER NOT NULL,
            key_id TEXT NOT NULL,
            body TEXT NOT NULL
        );
        ALTER TABLE records ADD COLUMN receipt_id INTEGER;
    """),
    # A delivery keeps its record's time: a named input's repeat check (one per named
    # input, on the inference thread) joined records by id, which has no index, so it
    # scanned every record kept (15 ms per input with 200,000 retained). An index on
    # records.id would cost every append a random b-tree insert; the copy costs none.
    # Adding the column rewrites nothing (it needs no free space, even on a full disk):
    # rows written before it keep 0 and are looked up through their record instead.
    ("0003_delivery_time", """
        ALTER TABLE deliveries ADD COLUMN request_time INTEGER NOT NULL DEFAULT 0;
    """),
]


class MeteringError(EdgeModuleError):
    """The ledger cannot store records (disk full, I/O error)."""


@dataclass(frozen=True)
class PendingRecord:
    seq: int
    id: str
    body: str  # the wire JSON


@dataclass
class Stats:
    pending: int
    accepted: int
    duplicates: int
    quarantined: int
    oldest_pending_ms: int | None
    last_drain_ms: int | None
    file_bytes: int

    def as_dict(self, now_ms: int | None = None) -> dict[str, Any]:
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        return {
            "pending": self.pending,
            "oldestPendingAgeSeconds": None if self.oldest_pending_ms is None
            else round(max(0, now_ms - self.oldest_pending_ms) / 1000, 3),
            "acknowledged": self.accepted + self.duplicates,
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "quarantined": self.quarantined,
            "lastSuccessfulDrain": self.last_drain_ms,  # epoch ms, for machines
            "lastSuccessfulDrainAt": None if self.last_drain_ms is None  # ISO, for people
            else datetime.fromtimestamp(self.last_drain_ms / 1000, UTC).isoformat(),
            "ledgerBytes": self.file_bytes,
        }


def _sidecars(path: Path) -> list[Path]:
    return [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]


class Ledger:
    def __init__(self, path: Path, identity: Identity, settings: MeteringSettings,
                 clock_ms: Callable[[], int] | None = None) -> None:
        self.path = path
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self._stats_cache: tuple[float, dict[int, int]] | None = None
        self.identity = identity
        self._writer = RecordWriter(identity)
        self.settings = settings
        self.recovered_from: Path | None = None
        self._lock = threading.Lock()
        # A second connection for the repeat checks the inference thread makes per named
        # input: in WAL mode it reads the last committed state while the commit thread
        # holds the writer (and its fsync), instead of waiting for it.
        self._reader: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        self._closed = False
        self._meter_ids: dict[tuple[str, str, str], int] = {}
        try:
            self._conn = self._open()
        except sqlite3.Error as exc:  # a full disk at first start, an unreadable folder
            raise MeteringError(f"cannot open the ledger {path}: {exc}; fix: free space "
                                "under Data:Path (or check its permissions)") from exc
        self._pending = self._scalar("SELECT count(*) FROM records WHERE state = 0")
        # request_time of the oldest pending record, kept current by append and settle
        # (the licence gate reads it for every batch); _UNKNOWN: read it again.
        self._oldest: object = _UNKNOWN
        self._bytes = self._file_bytes()
        self._bytes_checked = time.monotonic()
        self._warned = False
        self.quantity_added = 0  # quantity committed by this process
        self._reserved = 0  # admitted by admit(), not yet appended
        self.write_error: str | None = None  # the cause while writes fail, else None
        self._probed = 0.0

    # -- opening, integrity, migrations -----------------------------------

    def _open(self) -> sqlite3.Connection:
        if self.path.exists():
            problem = self._integrity_problem()
            if problem is not None:
                self._move_aside(problem)
        conn = self._connect()
        if self._migrate(conn):
            # A migration rewrites tables: fold its WAL back now, or the WAL (which
            # MaxLedgerMb counts) stays as large until the next write checkpoints it.
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return conn

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=10)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.settings.synchronous.upper()}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
        conn.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
        return conn

    def _integrity_problem(self) -> str | None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=10)
            try:
                rows = conn.execute("PRAGMA quick_check").fetchall()
                if rows != [("ok",)]:
                    return "; ".join(str(r[0]) for r in rows[:3])
                tables = {r[0] for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'")}
                if tables and "records" not in tables:
                    return "not a ledger (no records table)"
                if "records" in tables:
                    conn.execute("SELECT count(*) FROM records").fetchone()
            finally:
                conn.close()
        except sqlite3.DatabaseError as exc:
            code = getattr(exc, "sqlite_errorcode", None)
            if code is not None and code & 0xFF not in CORRUPTION_CODES:
                # The disk, not the file (full, I/O error, no permission): a good
                # ledger must never be moved aside for that.
                raise
            return str(exc)
        return None

    def _move_aside(self, problem: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for source in _sidecars(self.path):
            if source.exists():
                os.replace(source, target.with_name(target.name + source.name[
                    len(self.path.name):]))
        self.recovered_from = target
        log.error("ledger_corrupt_moved_aside", problem=problem, moved_to=str(target),
                  effect="a fresh ledger was started; records still pending in the moved "
                  "file are not uploaded until recovered",
                  fix=f"keep {target.name}; copy its pending records back with `edge-module "
                  f"ledger Data:Path={self.path.parent} --salvage {target}` (resends are "
                  "answered Duplicate, never billed twice), or send it to the vendor")

    def _migrate(self, conn: sqlite3.Connection) -> bool:
        """Apply the migrations not applied yet; True when there were any."""
        db = sqlite_utils.Database(conn)
        if "_migrations" not in db.table_names():
            db.table("_migrations").create({"name": str, "applied_at": int}, pk="name")
        applied = {row["name"] for row in db["_migrations"].rows}
        ran = False
        for name, sql in MIGRATIONS:
            if name in applied:
                continue
            ran = True
            with write_transaction(conn):
                for statement in (s for s in sql.split(";") if s.strip()):
                    conn.execute(statement)
                conn.execute("INSERT INTO _migrations (name, applied_at) VALUES (?, ?)",
                             (name, int(time.time() * 1000)))
            log.debug("ledger_migrated", migration=name)
        return ran

    # -- writes -----------------------------------------------------------

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """Hold the lock and run one write transaction. A failure drops the caches of
        the failed transaction, is remembered as ``write_error`` (``health``) and raises
        ``MeteringError`` naming the real cause."""
        with self._lock:
            try:
                with write_transaction(self._conn, self._meter_ids.clear) as conn:
                    yield conn
            except sqlite3.Error as exc:
                self._write_failed(what, exc)
                raise MeteringError(f"cannot {what} in {self.path}: {exc}") from exc
            if self.write_error is not None:
                log.info("ledger_writable_again", previous_error=self.write_error)
                self.write_error = None

    def _write_failed(self, what: str, exc: sqlite3.Error) -> None:
        full = disk_full(exc)
        cause = f"{exc} (the disk under {self.path.parent} is full)" if full else str(exc)
        if self.write_error != cause:
            log.error("ledger_write_failed", action=what, error=cause,
                      effect="inputs are answered MeteringUnavailable and no result is "
                      "released until a write succeeds; nothing recorded is lost",
                      fix="free space under Data:Path (or give the volume more); the module "
                      "recovers by itself" if full else "check the disk under Data:Path")
        self.write_error = cause

    def health(self) -> str | None:
        """None while the ledger can be written, else why not."""
        return self.write_error

    def probe(self) -> str | None:
        """While writes fail, try a tiny write (at most once a second) to notice space
        coming back; return ``health()`` afterwards."""
        if self.write_error is None or time.monotonic() - self._probed < PROBE_INTERVAL:
            return self.write_error
        self._probed = time.monotonic()
        try:
            with self._write("write a probe") as conn:
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES "
                             "('last_probe_ms', ?)", (str(int(time.time() * 1000)),))
        except MeteringError:
            pass
        return self.write_error

    def checkpoint(self) -> bool:
        """Copy the WAL into the database and truncate it (``wal_checkpoint(TRUNCATE)``);
        False when it could not finish (a full disk: tried again after the next drain)."""
        with self._lock:
            # TRUNCATE waits for readers of other connections (`edge-module ledger`):
            # wait briefly, never for the 10 s that would stall commits behind this lock.
            self._conn.execute("PRAGMA busy_timeout=200")
            try:
                busy, _, _ = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            except sqlite3.Error as exc:
                log.warning("ledger_checkpoint_failed", error=str(exc),
                            effect="the WAL keeps its size until the next checkpoint",
                            fix="free space under Data:Path")
                return False
            finally:
                self._conn.execute("PRAGMA busy_timeout=10000")
        self._bytes = self._file_bytes()
        return not busy

    # -- helpers ----------------------------------------------------------

    def _scalar(self, sql: str, args: Sequence[Any] = ()) -> int:
        with self._lock:
            row = self._conn.execute(sql, args).fetchone()
        return int(row[0] or 0) if row else 0

    def _file_bytes(self) -> int:
        return sum(p.stat().st_size for p in _sidecars(self.path) if p.exists())

    def _meter_id(self, meter: MeterSpec) -> int:
        key = (meter.name, meter.api_type, self.identity.container_version)
        found = self._meter_ids.get(key)
        if found is None:
            self._conn.execute(
                "INSERT OR IGNORE INTO meters (name, api_type, container_version) "
                "VALUES (?, ?, ?)", key)
            found = int(self._conn.execute(
                "SELECT meter_id FROM meters WHERE name = ? AND api_type = ? AND "
                "container_version = ?", key).fetchone()[0])
            self._meter_ids[key] = found
        return found

    # -- capacity -------------------------------------------------------

    @property
    def pending(self) -> int:
        return self._pending

    def fill_ratio(self) -> float:
        now = time.monotonic()
        if now - self._bytes_checked > 1.0:
            self._bytes = self._file_bytes()
            self._bytes_checked = now
        by_records = self._pending / self.settings.max_pending_records
        by_bytes = self._bytes / (self.settings.max_ledger_mb * 1024 * 1024)
        return max(by_records, by_bytes)

    def admit(self, wanted: int) -> int:
        """How many of ``wanted`` new transactions fit under the caps (warns at 80%)."""
        ratio = self.fill_ratio()
        with self._lock:
            # Room is reserved at admission: commits run on another thread, so records
            # admitted but not yet committed must count against the cap already.
            used = self._pending + self._reserved
            if self._bytes >= self.settings.max_ledger_mb * 1024 * 1024:
                allowed = 0
            else:
                allowed = max(0, min(wanted, self.settings.max_pending_records - used))
            self._reserved += allowed
        projected = max(ratio, (used + allowed) / self.settings.max_pending_records)
        if projected >= WARN_RATIO and not self._warned:
            self._warned = True
            log.warning("metering_buffer_high", fill=round(projected, 3),
                        pending=used + allowed,
                        fix="restore the link to the billing endpoint; at 100% new work is "
                        "refused")
        elif projected < WARN_RATIO * 0.9:
            self._warned = False
        return allowed

    def release(self, count: int) -> None:
        """Give back room admitted for transactions that will not be recorded."""
        with self._lock:
            self._reserved = max(0, self._reserved - count)

    def buffer_full(self) -> Refusal:
        return Refusal(ErrorCode.METERING_BUFFER_FULL,
                       f"the metering buffer is full ({self._pending} records waiting for "
                       "upload); new work is refused until the billing endpoint is reachable "
                       "again and the backlog drains")

    # -- appending and replays --------------------------------------------

    def append(self, meter: MeterSpec, usages: Sequence[Usage]) -> list[str]:
        """Commit one record per usage; return their ids. Durable when this returns."""
        now_ms = self.clock_ms()
        ids = [str(uuid.uuid4()) for _ in usages]
        committed = False
        try:
            with self._write("commit usage records") as conn:
                meter_id = self._meter_id(meter)
                conn.executemany(
                    "INSERT INTO records (id, meter_id, quantity, request_time) "
                    "VALUES (?, ?, ?, ?)",
                    [(rid, meter_id, u.quantity, now_ms) for rid, u in zip(
                        ids, usages, strict=True)])
                deliveries = [(u.delivery_key, u.digest, rid, now_ms) for rid, u in zip(
                    ids, usages, strict=True) if u.delivery_key is not None]
                if deliveries:
                    conn.executemany(
                        "INSERT OR REPLACE INTO deliveries (key, digest, record_id, "
                        "request_time) VALUES (?, ?, ?, ?)", deliveries)
            committed = True
        finally:
            # Whatever happened, the room admitted for these records is given back:
            # as committed records, or free again.
            with self._lock:
                self._reserved = max(0, self._reserved - len(ids))
                if committed:
                    if self._oldest is None:
                        self._oldest = now_ms
                    self._pending += len(ids)
                    self.quantity_added += sum(u.quantity for u in usages)
        return ids

    def replayed(self, key: str, digest: bytes, within_ms: int | None = None) -> str | None:
        """The record id of an earlier answer to this very delivery, if there was one
        (recorded at most ``within_ms`` ago, when given)."""
        return self.replayed_many([(key, digest)], within_ms).get((key, digest))

    def replayed_many(self, deliveries: Sequence[tuple[str, bytes]],
                      within_ms: int | None = None) -> dict[tuple[str, bytes], str]:
        """``replayed`` for a batch's deliveries in one statement (the inference thread
        asks once per batch): the ``(key, digest)`` pairs answered before, with their
        record ids. Reads committed records only, without waiting for a write in
        progress."""
        wanted = set(deliveries)
        if not wanted:
            return {}
        keys = sorted({key for key, _ in wanted})
        since = None if within_ms is None else self.clock_ms() - within_ms
        found: dict[tuple[str, bytes], str] = {}
        with self._read_lock:
            if self._closed:
                raise MeteringError(f"the ledger {self.path} is closed")
            if self._reader is None:
                self._reader = sqlite3.connect(self.path, isolation_level=None,
                                               check_same_thread=False, timeout=10)
                self._reader.execute("PRAGMA query_only=ON")
            for start in range(0, len(keys), 500):  # SQLite's bound-parameter limit
                chunk = keys[start:start + 500]
                rows = self._reader.execute(
                    "SELECT key, digest, record_id, request_time FROM deliveries WHERE key "
                    f"IN ({','.join('?' * len(chunk))})", chunk).fetchall()
                for key, digest, record_id, request_time in rows:
                    pair = (str(key), bytes(digest))
                    if pair not in wanted:
                        continue
                    if since is not None and request_time < since and not (
                            request_time == 0 and self._reader.execute(
                                _REPEAT_WITHIN, (*pair, since, since)).fetchone()):
                        continue  # too old (a row from before 0003: its record's time)
                    found[pair] = str(record_id)
        return found

    # -- draining ---------------------------------------------------------

    def newest_request_ms(self) -> int:
        """Time of the newest record: a floor for the trusted clock."""
        with self._lock:
            row = self._conn.execute(
                "SELECT request_time FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        return int(row[0]) if row else 0

    def quantity_since(self, since_ms: int) -> int:
        """Quantity recorded at or after ``since_ms`` (a scan: call it once, at start)."""
        return self._scalar("SELECT coalesce(sum(quantity), 0) FROM records WHERE "
                            "request_time >= ?", (since_ms,))

    def summarise_after(self, after_seq: int) -> tuple[int, list[dict[str, Any]]]:
        """Records after ``after_seq`` grouped by meter: (last seq, meters with quantity,
        record count, first and last request time)."""
        with self._lock:
            last = self._conn.execute("SELECT coalesce(max(seq), ?) FROM records",
                                      (after_seq,)).fetchone()[0]
            rows = self._conn.execute(
                "SELECT m.name, m.api_type, sum(r.quantity), count(*), min(r.request_time), "
                "max(r.request_time) FROM records r JOIN meters m USING (meter_id) "
                "WHERE r.seq > ? AND r.seq <= ? GROUP BY m.name, m.api_type ORDER BY m.name",
                (after_seq, last)).fetchall()
        return int(last), [{"name": r[0], "apiType": r[1], "quantity": int(r[2]),
                            "records": int(r[3]), "first": int(r[4]), "last": int(r[5])}
                           for r in rows]

    def oldest_pending_ms(self) -> int | None:
        """``requestTime`` (trusted time) of the oldest record waiting for upload.

        The licence gate asks before every batch: a cached answer is one attribute read,
        without waiting for a commit in progress to release the writer's lock."""
        cached = self._oldest
        if cached is None or isinstance(cached, int):
            return cached
        with self._lock:
            if self._oldest is _UNKNOWN:
                row = self._conn.execute(
                    "SELECT request_time FROM records WHERE state = 0 ORDER BY seq LIMIT 1"
                ).fetchone()
                self._oldest = int(row[0]) if row else None
            oldest = self._oldest
        return oldest if isinstance(oldest, int) else None

    def pending_batch(self, limit: int, after_seq: int = 0) -> list[PendingRecord]:
        """The oldest pending records (in commit order), as wire JSON."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT r.seq, r.id, m.name, r.quantity, r.request_time, m.api_type, "
                "m.container_version FROM records r JOIN meters m USING (meter_id) "
                "WHERE r.state = 0 AND r.seq > ? ORDER BY r.seq LIMIT ?",
                (after_seq, limit)).fetchall()
        write = self._writer.json
        return [PendingRecord(seq, rid, write(rid, version, name, quantity, request_time,
                                              api_type))
                for seq, rid, name, quantity, request_time, api_type, version in rows]

    def settle(self, delivered: Iterable[tuple[int, int]],
               quarantined: Iterable[tuple[int, str]] = (),
               retried: Iterable[int] = (), receipt: dict[str, Any] | None = None) -> None:
        """Mark records: ``(seq, ACCEPTED|DUPLICATE)``, ``(seq, reason)`` quarantined.

        ``receipt``: the verified receipt that settles them, stored and linked to every
        delivered and quarantined record in the same transaction, so no record is ever
        settled without the receipt that proves it.
        """
        now_ms = int(time.time() * 1000)
        done = [(state, now_ms, seq) for seq, state in delivered]
        bad = [(now_ms, reason[:500], seq) for seq, reason in quarantined]
        again = [(seq,) for seq in retried]
        with self._write("settle uploaded records") as conn:
            if receipt is not None and (done or bad):
                self._store_receipt(conn, receipt, [d[2] for d in done] + [b[2] for b in bad])
            before = conn.total_changes
            conn.executemany("UPDATE records SET state = ?, settled_at = ?, "
                             "attempts = attempts + 1 WHERE seq = ? AND state = 0", done)
            conn.executemany("UPDATE records SET state = 3, settled_at = ?, reason = ?, "
                             "attempts = attempts + 1 WHERE seq = ? AND state = 0", bad)
            left_pending = conn.total_changes - before  # rows that were pending until now
            conn.executemany("UPDATE records SET attempts = attempts + 1 WHERE seq = ?",
                             again)
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES "
                         "('last_drain_ms', ?)", (str(now_ms),))
        with self._lock:
            # Counted from the rows changed, not recounted: a COUNT(*) per batch made
            # draining a large backlog quadratic.
            self._pending -= left_pending
            self._oldest = _UNKNOWN

    @staticmethod
    def _store_receipt(conn: sqlite3.Connection, receipt: dict[str, Any],
                       seqs: Sequence[int]) -> None:
        """Store a verified receipt and link the records it settles (inside ``settle``)."""
        body = json.dumps(receipt, separators=(",", ":"), sort_keys=True)
        cursor = conn.execute(
            "INSERT INTO receipts (received_at, key_id, body) VALUES (?, ?, ?)",
            (int(time.time() * 1000), str(receipt.get("keyId")), body))
        conn.executemany("UPDATE records SET receipt_id = ? WHERE seq = ?",
                         [(cursor.lastrowid, seq) for seq in seqs])

    def receipt_of(self, record_id: str) -> dict[str, Any] | None:
        """The signed receipt that settled a record (audits), if it is still kept."""
        with self._lock:
            row = self._conn.execute(
                "SELECT r.body FROM records JOIN receipts r USING (receipt_id) "
                "WHERE records.id = ?", (record_id,)).fetchone()
        return dict(json.loads(row[0])) if row else None

    def prune(self) -> int:
        """Delete acknowledged records older than the retention; return how many."""
        cutoff = int((time.time() - self.settings.retention_hours * 3600) * 1000)
        with self._write("prune acknowledged records") as conn:
            # Deliveries of pruned records go too: keys such as edgeHub message ids are
            # never reused, so the table would otherwise grow without bound.
            conn.execute(
                "DELETE FROM deliveries WHERE record_id IN (SELECT id FROM records WHERE "
                "state IN (1, 2) AND settled_at < ?)", (cutoff,))
            cursor = conn.execute(
                "DELETE FROM records WHERE state IN (1, 2) AND settled_at < ?", (cutoff,))
            removed = cursor.rowcount
            self._conn.execute("DELETE FROM receipts WHERE receipt_id NOT IN (SELECT "
                               "receipt_id FROM records WHERE receipt_id IS NOT NULL)")
        if removed:
            log.info("ledger_pruned", removed=removed)
        return int(removed)

    def stats(self, max_age: float = 0.0) -> Stats:
        """The backlog figures. The settled counts come from a scan of every record kept,
        which may be reused for ``max_age`` seconds, so frequent /status or /metrics
        polls cannot hold the ledger's lock (and the commits behind it) with scans; the
        pending count, the oldest pending record and the last drain are always current."""
        cached = self._stats_cache
        if max_age and cached is not None and time.monotonic() - cached[0] < max_age:
            counts = cached[1]
        else:
            with self._lock:
                counts = dict(self._conn.execute(
                    "SELECT state, count(*) FROM records GROUP BY state").fetchall())
            self._stats_cache = (time.monotonic(), counts)
        with self._lock:
            last = self._conn.execute(
                "SELECT value FROM meta WHERE key = 'last_drain_ms'").fetchone()
            pending = self._pending
        return Stats(
            pending=pending,
            accepted=int(counts.get(ACCEPTED, 0)),
            duplicates=int(counts.get(DUPLICATE, 0)),
            quarantined=int(counts.get(QUARANTINED, 0)),
            oldest_pending_ms=self.oldest_pending_ms(),
            last_drain_ms=int(last[0]) if last else None,
            file_bytes=self._file_bytes(),
        )

    def salvage(self, source: Path) -> tuple[int, int]:
        """Copy the still-pending records of a moved-aside ledger into this one.

        Records keep their ids, so one the endpoint already has is answered
        Duplicate: salvaging never bills twice. The old file is read in chunks of
        rows; a chunk that cannot be read is read row by row, so a damaged page
        costs only the rows on it. Returns (copied, unreadable rows).
        """
        try:
            old = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        except sqlite3.DatabaseError as exc:
            raise MeteringError(f"{source} cannot be opened ({exc}); keep it for the "
                                "vendor") from exc
        try:
            rows, unreadable = _readable_pending(old)
        finally:
            old.close()
        copied = 0
        with self._write("salvage records") as conn:
            known = {r[0] for r in conn.execute("SELECT id FROM records")}
            for rid, name, api_type, version, quantity, request_time in rows:
                if rid in known:
                    continue
                conn.execute("INSERT OR IGNORE INTO meters (name, api_type, "
                             "container_version) VALUES (?, ?, ?)",
                             (name, api_type, version))
                meter_id = conn.execute(
                    "SELECT meter_id FROM meters WHERE name = ? AND api_type = ? AND "
                    "container_version = ?", (name, api_type, version)).fetchone()[0]
                conn.execute("INSERT INTO records (id, meter_id, quantity, request_time) "
                             "VALUES (?, ?, ?, ?)", (rid, meter_id, quantity, request_time))
                known.add(rid)
                copied += 1
        with self._lock:
            self._pending += copied
            self._oldest = _UNKNOWN
        if unreadable:
            log.warning("salvage_rows_unreadable", source=str(source), unreadable=unreadable,
                        copied=copied, effect="those records cannot be uploaded from this "
                        "file", fix="keep the file for the vendor, who can reconcile it")
        return copied, unreadable

    def quarantined(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, reason, settled_at FROM records WHERE state = 3 "
                "ORDER BY seq LIMIT ?", (limit,)).fetchall()
        return [{"id": r[0], "reason": r[1], "at": r[2]} for r in rows]

    def close(self) -> None:
        with self._read_lock:
            self._closed = True
            if self._reader is not None:
                self._reader.close()
                self._reader = None
        with self._lock:
            self._conn.close()


_SALVAGE_SELECT = ("SELECT r.seq, r.id, m.name, m.api_type, m.container_version, r.quantity, "
                   "r.request_time, r.state FROM records r JOIN meters m USING (meter_id) ")
_SALVAGE_CHUNK = 256


def _readable_pending(old: sqlite3.Connection) -> tuple[list[tuple[Any, ...]], int]:
    """The pending rows of a (possibly damaged) ledger that can be read, and how many
    rows could not be read or hold values no record can have."""
    try:
        top = old.execute("SELECT max(seq) FROM records").fetchone()[0]
    except sqlite3.DatabaseError:
        try:
            row = old.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'")
            top = row.fetchone()[0]
        except (sqlite3.DatabaseError, TypeError) as exc:
            raise MeteringError(f"the records of this file cannot be found ({exc}); keep it "
                                "for the vendor") from exc
    rows: list[tuple[Any, ...]] = []
    unreadable = 0
    for low in range(1, int(top or 0) + 1, _SALVAGE_CHUNK):
        high = low + _SALVAGE_CHUNK - 1
        try:
            chunk = old.execute(_SALVAGE_SELECT + "WHERE r.seq BETWEEN ? AND ? ORDER BY r.seq",
                                (low, high)).fetchall()
        except sqlite3.DatabaseError:
            chunk = []
            for seq in range(low, high + 1):
                try:
                    chunk.extend(old.execute(_SALVAGE_SELECT + "WHERE r.seq = ?",
                                             (seq,)).fetchall())
                except sqlite3.DatabaseError:
                    unreadable += 1
        for _seq, rid, name, api_type, version, quantity, request_time, state in chunk:
            if state != PENDING:
                continue
            if not (isinstance(rid, str) and isinstance(name, str) and
                    isinstance(api_type, str) and isinstance(version, str) and
                    isinstance(quantity, int) and quantity > 0 and
                    isinstance(request_time, int)):
                unreadable += 1
                continue
            rows.append((rid, name, api_type, version, quantity, request_time))
    return rows, unreadable
