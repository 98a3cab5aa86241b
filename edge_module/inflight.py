"""Requests between admission and their usage record: which repeats may still be in flight.

A named request (or a redelivery) is recognised as a repeat by the ledger once the first
copy's record is committed. A copy that arrives while the first is still between
admission and its commit finds nothing in the ledger; without this map it would be
billed a second time. ``InFlight`` counts the copies of each delivery key (the
replay key and payload digest) that the pipeline holds, so that a copy arriving while
another is held is marked: at its own commit, after the first copy's (the commit
thread commits in admission order), the pipeline looks the ledger up again and answers
it as a replay of the first copy's record, or bills it if the first copy was never
billed (it failed, was refused or nobody waited for it).

Bounded: an entry lives only while a copy is held (every path that lets a job go calls
``leave``, at most once per job), at most ``limit`` keys are tracked, and an entry
not entered for ``max_age`` seconds (a job lost to a bug) is forgotten. Past the limit a new
key is reported as possibly in flight: a spare ledger look-up, never a second record.

Threads: the inference thread enters, the inference and commit threads leave; a lock
keeps the counts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable

Key = Hashable


class InFlight:
    def __init__(self, limit: int = 65536, max_age: float = 600.0) -> None:
        self._limit = limit
        self._max_age = max_age
        self._lock = threading.Lock()
        self._copies: dict[Key, list[float]] = {}  # key -> [copies held, last entered]

    def enter(self, key: Key) -> bool:
        """Hold one more copy of ``key``; True when another copy was already held (or
        the map is full, so that cannot be ruled out)."""
        now = time.monotonic()
        with self._lock:
            entry = self._copies.get(key)
            if entry is not None and now - entry[1] <= self._max_age:
                entry[0] += 1
                entry[1] = now
                return True
            if entry is None and len(self._copies) >= self._limit:
                self._forget_older_than(now - self._max_age)
                if len(self._copies) >= self._limit:
                    return True  # untracked: the caller checks the ledger at commit
            self._copies[key] = [1, now]
            return False

    def leave(self, key: Key) -> None:
        """One copy of ``key`` is no longer held (answered, refused or failed)."""
        with self._lock:
            entry = self._copies.get(key)
            if entry is None:
                return
            entry[0] -= 1
            if entry[0] <= 0:
                del self._copies[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._copies)

    def _forget_older_than(self, cutoff: float) -> None:
        for key in [k for k, (_, since) in self._copies.items() if since < cutoff]:
            del self._copies[key]
