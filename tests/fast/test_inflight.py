"""The in-flight map's bounds: counts per key, a size limit that errs on the safe side,
entries of jobs lost to a bug forgotten after ``max_age`` when room is needed, and a copy
that only ever takes back the count it added."""

from __future__ import annotations

import time

from edge_module.inflight import InFlight


def test_copies_are_counted_until_the_last_one_leaves() -> None:
    flights = InFlight()
    first = flights.enter("a")
    second = flights.enter("a")
    assert (first.copy, second.copy) == (False, True)
    flights.leave(first)
    third = flights.enter("a")
    assert third.copy is True  # one copy is still held
    flights.leave(second)
    flights.leave(third)
    assert len(flights) == 0
    flights.leave(third)  # leaving twice is harmless
    assert flights.enter("a").copy is False


def test_a_full_map_reports_a_possible_copy_and_never_grows_past_its_limit() -> None:
    flights = InFlight(limit=2)
    a, b, c = (flights.enter(k) for k in ("a", "b", "c"))
    assert [a.copy, b.copy, c.copy] == [False, False, True]
    assert len(flights) == 2 and not c.tracked  # "c" untracked: its commit checks the ledger
    flights.leave(a)
    assert flights.enter("c").copy is False and len(flights) == 2


def test_an_untracked_copy_leaving_takes_nothing_from_a_later_copy() -> None:
    """The map is full when the first copy of "c" enters (untracked); room is made and a
    second copy of "c" is tracked; the first one leaving must not end the second's entry,
    or a third copy arriving meanwhile would be taken for the first and billed again."""
    flights = InFlight(limit=2)
    a, _ = flights.enter("a"), flights.enter("b")
    untracked = flights.enter("c")
    flights.leave(a)
    tracked = flights.enter("c")
    assert tracked.tracked and tracked.copy is False
    flights.leave(untracked)
    assert flights.enter("c").copy is True  # the tracked copy is still held
    flights.leave(tracked)


def test_an_old_entry_still_held_is_counted_on_never_reset() -> None:
    """A copy held past ``max_age`` (a stalled commit) is still held: a copy entering now
    is a possible repeat, and the old one leaving keeps the new one's count."""
    flights = InFlight(max_age=0.05)
    old = flights.enter("slow")
    time.sleep(0.1)
    new = flights.enter("slow")
    assert new.copy is True
    flights.leave(old)
    assert flights.enter("slow").copy is True  # ``new`` is still held


def test_an_entry_nobody_entered_for_max_age_is_forgotten_when_room_is_needed() -> None:
    flights = InFlight(limit=1, max_age=0.05)
    lost = flights.enter("lost")  # a job lost to a bug never leaves
    time.sleep(0.1)
    fresh = flights.enter("fresh")
    assert fresh.copy is False and len(flights) == 1
    flights.leave(lost)  # the forgotten copy leaving touches nothing
    assert len(flights) == 1
    assert flights.enter("lost").copy is True  # the map is full again: the safe answer
