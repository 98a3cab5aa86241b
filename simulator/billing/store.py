"""The simulator's persistence: received usage records in SQLite, deduplicated by id."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from pathlib import Path
from typing import Any


class UsageStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS usage (id TEXT PRIMARY KEY, key_hash TEXT NOT NULL, "
            "meter TEXT NOT NULL, quantity INTEGER NOT NULL, container_type TEXT NOT NULL, "
            "container_version TEXT NOT NULL, container_id TEXT NOT NULL, "
            "request_time INTEGER NOT NULL, api_type TEXT NOT NULL, "
            "received_at INTEGER NOT NULL)")
        self._conn.execute("CREATE TABLE IF NOT EXISTS stats (name TEXT PRIMARY KEY, "
                           "value INTEGER NOT NULL)")
        self._lock = threading.Lock()
        self._quantity: dict[str, int] = {}

    @staticmethod
    def _hash(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def insert(self, key: str, records: list[dict[str, Any]], now_ms: int) -> set[str]:
        """Insert new records; return the ids that were new (the rest are duplicates)."""
        key_hash = self._hash(key)
        with self._lock:
            known = self._known_locked([r["id"] for r in records])
            new: set[str] = set()
            rows = []
            for r in records:
                rid = r["id"]
                if rid in known or rid in new:
                    continue
                new.add(rid)
                rows.append((rid, key_hash, r["meter"]["name"], int(r["meter"]["quantity"]),
                             r["containerType"], r["containerVersion"], r["containerId"],
                             r["requestTime"], r["apiType"], now_ms))
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany("INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                   rows)
            duplicates = len(records) - len(rows)
            if duplicates:
                self._conn.execute(
                    "INSERT INTO stats VALUES ('duplicates', ?) ON CONFLICT(name) DO UPDATE "
                    "SET value = value + excluded.value", (duplicates,))
            self._conn.execute("COMMIT")
            if key_hash in self._quantity:
                self._quantity[key_hash] += sum(row[3] for row in rows)
        return new

    def _quantity_locked(self, key_hash: str) -> int:
        row = self._conn.execute("SELECT coalesce(sum(quantity), 0) FROM usage WHERE "
                                 "key_hash = ?", (key_hash,)).fetchone()
        return int(row[0])

    def quantity_for(self, key: str) -> int:
        key_hash = self._hash(key)
        with self._lock:
            if key_hash not in self._quantity:
                self._quantity[key_hash] = self._quantity_locked(key_hash)
            return self._quantity[key_hash]

    def known_ids(self, ids: list[str]) -> set[str]:
        with self._lock:
            return self._known_locked(ids)

    def _known_locked(self, ids: list[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(r[0] for r in self._conn.execute(
                f"SELECT id FROM usage WHERE id IN ({marks})", chunk))
        return found

    def totals(self) -> dict[str, Any]:
        with self._lock:
            count, quantity = self._conn.execute(
                "SELECT count(*), coalesce(sum(quantity), 0) FROM usage").fetchone()
            duplicates = self._conn.execute(
                "SELECT coalesce(max(value), 0) FROM stats WHERE name = 'duplicates'"
            ).fetchone()[0]
            meters = dict(self._conn.execute(
                "SELECT meter, sum(quantity) FROM usage GROUP BY meter").fetchall())
        return {"records": int(count), "quantity": int(quantity),
                "duplicates": int(duplicates), "byMeter": meters}

    def records(self, limit: int = 100000) -> list[dict[str, Any]]:
        """The records as received (same fields; stored as columns, not as text)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, container_type, container_version, container_id, meter, quantity, "
                "request_time, api_type FROM usage ORDER BY rowid LIMIT ?", (limit,)).fetchall()
        return [{"id": r[0], "containerType": r[1], "containerVersion": r[2],
                 "containerId": r[3], "meter": {"name": r[4], "quantity": r[5]},
                 "requestTime": r[6], "apiType": r[7]} for r in rows]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
