"""The in-flight map's bounds: counts per key, a size limit that errs on the safe side, and
entries of jobs lost to a bug forgotten after ``max_age``."""

from __future__ import annotations

import time

from edge_module.inflight import InFlight


def test_copies_are_counted_until_the_last_one_leaves() -> None:
    flights = InFlight()
    assert flights.enter("a") is False  # the first copy
    assert flights.enter("a") is True  # a copy while the first is held
    flights.leave("a")
    assert flights.enter("a") is True  # one copy is still held
    flights.leave("a")
    flights.leave("a")
    assert len(flights) == 0
    flights.leave("a")  # leaving twice is harmless
    assert flights.enter("a") is False


def test_a_full_map_reports_a_possible_copy_and_never_grows_past_its_limit() -> None:
    flights = InFlight(limit=2)
    assert [flights.enter(k) for k in ("a", "b", "c")] == [False, False, True]
    assert len(flights) == 2  # "c" untracked: its commit checks the ledger
    flights.leave("c")
    flights.leave("a")
    assert flights.enter("c") is False and len(flights) == 2


def test_an_entry_nobody_entered_for_max_age_is_forgotten() -> None:
    flights = InFlight(limit=1, max_age=0.05)
    flights.enter("lost")  # a job lost to a bug never leaves
    time.sleep(0.1)
    assert flights.enter("fresh") is False and len(flights) == 1
    assert flights.enter("lost") is True  # the map is full again: the safe answer
