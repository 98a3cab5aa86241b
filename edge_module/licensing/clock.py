"""Trusted time: a clock that cannot be rolled back to extend a grace.

* At start, trusted time is the latest of: the wall clock, the persisted
  high-water mark, the issue time of the last signed lease, and the time of
  the newest usage record. Restarting with an earlier clock starts from there.
* While running, time is counted on the monotonic clock from that base, so
  setting the wall clock back (or forward) changes nothing.
* Each verified lease carries the server's time; it becomes the new base (the
  server is the authority, in both directions).
* The high-water mark is written to ``Data:Path/trusted-clock.json`` every
  ``persist_every`` seconds, when a lease is adopted, and at shutdown.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path


class TrustedClock:
    def __init__(self, path: Path, floors_ms: tuple[int, ...] = (),
                 wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 persist_every: float = 30.0) -> None:
        self.path = path
        self._wall = wall
        self._mono = monotonic
        self._persist_every = persist_every
        self._lock = threading.Lock()
        persisted = self._load()
        self._base_ms = max(int(wall() * 1000), persisted, *floors_ms, 0)
        self._base_mono = monotonic()
        self._persisted_at = self._base_mono
        self.rollback_detected_ms = max(0, max(persisted, *floors_ms, 0) - int(wall() * 1000))
        self.persist()

    def _load(self) -> int:
        try:
            return int(json.loads(self.path.read_text())["highWaterMs"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def now_ms(self) -> int:
        with self._lock:
            now = self._base_ms + int((self._mono() - self._base_mono) * 1000)
            due = self._mono() - self._persisted_at >= self._persist_every
        if due:
            self.persist()
        return now

    def raise_floor(self, floor_ms: int) -> None:
        """Trusted time is at least ``floor_ms`` (e.g. the issue time of a stored lease)."""
        with self._lock:
            now = self._base_ms + int((self._mono() - self._base_mono) * 1000)
            if floor_ms > now:
                self.rollback_detected_ms = max(self.rollback_detected_ms,
                                                floor_ms - int(self._wall() * 1000))
                self._base_ms = floor_ms
                self._base_mono = self._mono()

    def adopt(self, server_ms: int) -> None:
        """Take the time of a verified lease as the truth."""
        with self._lock:
            self._base_ms = int(server_ms)
            self._base_mono = self._mono()
        self.persist()

    def persist(self) -> None:
        with self._lock:
            value = self._base_ms + int((self._mono() - self._base_mono) * 1000)
            self._persisted_at = self._mono()
        tmp = self.path.with_suffix(".tmp")
        try:
            with open(tmp, "w") as handle:
                json.dump({"highWaterMs": value}, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except OSError:
            pass  # the ledger and the lease still give floors; never stop serving for this
