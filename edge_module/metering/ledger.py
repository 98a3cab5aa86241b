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
* **Corruption** found by the integrity check at start moves the file aside
  (never deletes it) and starts a fresh ledger.

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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from edge_module.config import MeteringSettings
from edge_module.exceptions import EdgeModuleError, Refusal
from edge_module.logs import get_logger
from edge_module.metering.records import Identity, MeterSpec, Usage

log = get_logger("ledger")

PENDING, ACCEPTED, DUPLICATE, QUARANTINED = 0, 1, 2, 3
STATE_NAMES = {PENDING: "pending", ACCEPTED: "accepted", DUPLICATE: "duplicate",
               QUARANTINED: "quarantined"}
WARN_RATIO = 0.8
BUFFER_FULL = "MeteringBufferFull"

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
        self.identity = identity
        self.settings = settings
        self.recovered_from: Path | None = None
        self._lock = threading.Lock()
        self._meter_ids: dict[tuple[str, str, str], int] = {}
        self._conn = self._open()
        self._pending = self._scalar("SELECT count(*) FROM records WHERE state = 0")
        self._bytes = self._file_bytes()
        self._bytes_checked = time.monotonic()
        self._warned = False
        self.quantity_added = 0  # quantity committed by this process
        self._reserved = 0  # admitted by admit(), not yet appended

    # -- opening, integrity, migrations -----------------------------------

    def _open(self) -> sqlite3.Connection:
        if self.path.exists():
            problem = self._integrity_problem()
            if problem is not None:
                self._move_aside(problem)
        conn = self._connect()
        self._migrate(conn)
        return conn

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=10)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.settings.synchronous.upper()}")
        conn.execute("PRAGMA foreign_keys=ON")
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

    def _migrate(self, conn: sqlite3.Connection) -> None:
        db = sqlite_utils.Database(conn)
        if "_migrations" not in db.table_names():
            db.table("_migrations").create({"name": str, "applied_at": int}, pk="name")
        applied = {row["name"] for row in db["_migrations"].rows}
        for name, sql in MIGRATIONS:
            if name in applied:
                continue
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in (s for s in sql.split(";") if s.strip()):
                    conn.execute(statement)
                conn.execute("INSERT INTO _migrations (name, applied_at) VALUES (?, ?)",
                             (name, int(time.time() * 1000)))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            log.debug("ledger_migrated", migration=name)

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
        return Refusal(BUFFER_FULL,
                       f"the metering buffer is full ({self._pending} records waiting for "
                       "upload); new work is refused until the billing endpoint is reachable "
                       "again and the backlog drains")

    # -- appending and replays --------------------------------------------

    def append(self, meter: MeterSpec, usages: Sequence[Usage]) -> list[str]:
        """Commit one record per usage; return their ids. Durable when this returns."""
        now_ms = self.clock_ms()
        ids = [str(uuid.uuid4()) for _ in usages]
        try:
            with self._lock:
                conn = self._conn
                conn.execute("BEGIN IMMEDIATE")
                try:
                    meter_id = self._meter_id(meter)
                    conn.executemany(
                        "INSERT INTO records (id, meter_id, quantity, request_time) "
                        "VALUES (?, ?, ?, ?)",
                        [(rid, meter_id, u.quantity, now_ms) for rid, u in zip(
                            ids, usages, strict=True)])
                    deliveries = [(u.delivery_key, u.digest, rid) for rid, u in zip(
                        ids, usages, strict=True) if u.delivery_key is not None]
                    if deliveries:
                        conn.executemany(
                            "INSERT OR REPLACE INTO deliveries (key, digest, record_id) "
                            "VALUES (?, ?, ?)", deliveries)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    self._reserved = max(0, self._reserved - len(ids))
                    raise
                self._pending += len(ids)
                self._reserved = max(0, self._reserved - len(ids))
                self.quantity_added += sum(u.quantity for u in usages)
        except sqlite3.Error as exc:
            raise MeteringError(f"cannot commit usage records to {self.path}: {exc}") from exc
        return ids

    def replayed(self, key: str, digest: bytes) -> str | None:
        """The record id of an earlier answer to this very delivery, if there was one."""
        with self._lock:
            row = self._conn.execute(
                "SELECT record_id FROM deliveries WHERE key = ? AND digest = ?",
                (key, digest)).fetchone()
        return str(row[0]) if row else None

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
        with self._lock:
            row = self._conn.execute(
                "SELECT request_time FROM records WHERE state = 0 ORDER BY seq LIMIT 1"
            ).fetchone()
        return int(row[0]) if row else None

    def pending_batch(self, limit: int, after_seq: int = 0) -> list[PendingRecord]:
        """The oldest pending records (in commit order), as wire JSON."""
        ident = self.identity
        with self._lock:
            rows = self._conn.execute(
                "SELECT r.seq, r.id, m.name, r.quantity, r.request_time, m.api_type, "
                "m.container_version FROM records r JOIN meters m USING (meter_id) "
                "WHERE r.state = 0 AND r.seq > ? ORDER BY r.seq LIMIT ?",
                (after_seq, limit)).fetchall()
        prefix = (f'","containerType":"{ident.container_type}","containerVersion":"')
        out = []
        for seq, rid, name, quantity, request_time, api_type, version in rows:
            body = (f'{{"id":"{rid}{prefix}{version}","containerId":"{ident.container_id}",'
                    f'"meter":{{"name":{_js(name)},"quantity":{quantity}}},'
                    f'"requestTime":{request_time},"apiType":{_js(api_type)}}}')
            out.append(PendingRecord(seq, rid, body))
        return out

    def settle(self, delivered: Iterable[tuple[int, int]],
               quarantined: Iterable[tuple[int, str]] = (),
               retried: Iterable[int] = ()) -> None:
        """Mark records: ``(seq, ACCEPTED|DUPLICATE)``, ``(seq, reason)`` quarantined."""
        now_ms = int(time.time() * 1000)
        done = [(state, now_ms, seq) for seq, state in delivered]
        bad = [(now_ms, reason[:500], seq) for seq, reason in quarantined]
        again = [(seq,) for seq in retried]
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
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
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            # Counted from the rows changed, not recounted: a COUNT(*) per batch made
            # draining a large backlog quadratic.
            self._pending -= left_pending

    def prune(self) -> int:
        """Delete acknowledged records older than the retention; return how many."""
        cutoff = int((time.time() - self.settings.retention_hours * 3600) * 1000)
        with self._lock:
            # Deliveries of pruned records go too: keys such as edgeHub message ids are
            # never reused, so the table would otherwise grow without bound.
            self._conn.execute(
                "DELETE FROM deliveries WHERE record_id IN (SELECT id FROM records WHERE "
                "state IN (1, 2) AND settled_at < ?)", (cutoff,))
            cursor = self._conn.execute(
                "DELETE FROM records WHERE state IN (1, 2) AND settled_at < ?", (cutoff,))
            removed = cursor.rowcount
        if removed:
            log.info("ledger_pruned", removed=removed)
        return int(removed)

    def stats(self) -> Stats:
        with self._lock:
            counts = dict(self._conn.execute(
                "SELECT state, count(*) FROM records GROUP BY state").fetchall())
            last = self._conn.execute(
                "SELECT value FROM meta WHERE key = 'last_drain_ms'").fetchone()
        return Stats(
            pending=int(counts.get(PENDING, 0)),
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
        Duplicate: salvaging never bills twice. Returns (copied, unreadable rows).
        """
        try:
            old = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
            rows = old.execute("SELECT r.id, m.name, m.api_type, m.container_version, "
                               "r.quantity, r.request_time FROM records r JOIN meters m "
                               "USING (meter_id) WHERE r.state = 0 ORDER BY r.seq").fetchall()
            old.close()
        except sqlite3.DatabaseError as exc:
            raise MeteringError(f"{source} cannot be read ({exc}); keep it for the vendor") \
                from exc
        copied = 0
        with self._lock:
            conn = self._conn
            known = {r[0] for r in conn.execute("SELECT id FROM records")}
            conn.execute("BEGIN IMMEDIATE")
            try:
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
                    copied += 1
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._pending += copied
        return copied, 0

    def quarantined(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, reason, settled_at FROM records WHERE state = 3 "
                "ORDER BY seq LIMIT ?", (limit,)).fetchall()
        return [{"id": r[0], "reason": r[1], "at": r[2]} for r in rows]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _js(text: str) -> str:
    return json.dumps(text)
