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

Each ``enter`` returns a ``Held`` that its ``leave`` gives back: a copy only ever
decrements the count it incremented. A copy entered while the map is full is held
untracked (reported as possibly a repeat; its ``leave`` is a no-op), and a copy whose
entry was forgotten leaves nothing behind, so neither can take a count away from
copies entered later under the same key. A live count is never reset: a key entered
again while an entry is held counts one more copy, however old that entry is.

Bounded: an entry lives only while a copy is held (every path that lets a job go calls
``leave``, at most once per job), at most ``limit`` keys are tracked, and when the map
is full, entries not entered for ``max_age`` seconds (jobs lost to a bug) are forgotten
to make room. Past the limit a new key is reported as possibly in flight: a spare ledger
look-up, never a second record.

Threads: the inference thread enters, the inference and commit threads leave; a lock
keeps the counts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass, field

Key = Hashable


@dataclass(eq=False)
class _Entry:
    copies: int
    entered: float  # monotonic time of the latest enter


@dataclass(eq=False)
class Held:
    """One copy held under ``key``: ``copy`` when another copy was (or may have been)
    held when it entered; ``tracked`` False when the map was full (nothing to leave)."""

    key: Key
    copy: bool
    _entry: _Entry | None = field(default=None, repr=False)

    @property
    def tracked(self) -> bool:
        return self._entry is not None


class InFlight:
    def __init__(self, limit: int = 65536, max_age: float = 600.0) -> None:
        self._limit = limit
        self._max_age = max_age
        self._lock = threading.Lock()
        self._copies: dict[Key, _Entry] = {}

    def enter(self, key: Key) -> Held:
        """Hold one more copy of ``key``. Its ``copy`` is True when another copy was
        already held (or the map is full, so that cannot be ruled out)."""
        now = time.monotonic()
        with self._lock:
            entry = self._copies.get(key)
            if entry is not None:  # a live count: one more copy, never a reset
                entry.copies += 1
                entry.entered = now
                return Held(key, True, entry)
            if len(self._copies) >= self._limit:
                self._forget_older_than(now - self._max_age)
                if len(self._copies) >= self._limit:
                    return Held(key, True)  # untracked: the caller checks the ledger
            entry = self._copies[key] = _Entry(1, now)
            return Held(key, False, entry)

    def leave(self, held: Held) -> None:
        """The copy ``held`` is no longer held (answered, refused or failed). Only the
        entry it counted in is touched: an untracked copy, one whose entry was forgotten,
        or one left already, changes nothing."""
        entry = held._entry
        if entry is None:
            return
        held._entry = None
        with self._lock:
            if self._copies.get(held.key) is not entry:
                return  # forgotten meanwhile: the key's current entry is other copies'
            entry.copies -= 1
            if entry.copies <= 0:
                del self._copies[held.key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._copies)

    def _forget_older_than(self, cutoff: float) -> None:
        for key in [k for k, entry in self._copies.items() if entry.entered < cutoff]:
            del self._copies[key]
