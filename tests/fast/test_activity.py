"""The status page's recent activity: windows, percentiles, bounded error codes."""

from __future__ import annotations

from edge_module.activity import MAX_CODES, WINDOW_SECONDS, Activity
from edge_module.api.page import human_bytes, human_duration


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_answers_latencies_and_errors_per_model_over_the_window() -> None:
    clock = Clock()
    activity = Activity(clock)
    for ms in range(1, 101):  # 1..100 ms
        activity.answered(("digits", "1"), float(ms))
    activity.failed("Unlicensed", ("digits", "1"))
    clock.now += 1
    activity.failed("InvalidJson")  # no model known
    clock.now += 9
    figures = activity.models()[("digits", "1")]
    assert figures["answers"] == 100 and figures["errors"] == 1
    assert figures["p50Ms"] == 50 and figures["p99Ms"] == 99
    assert figures["answersPerSecond"] == 10.0  # 100 answers over the 10 s since the first
    assert [e["code"] for e in activity.recent_errors()] == ["InvalidJson", "Unlicensed"]
    clock.now += WINDOW_SECONDS  # all of it leaves the window; the totals stay
    figures = activity.models()[("digits", "1")]
    assert (figures["answers"], figures["errors"], figures["p50Ms"]) == (0, 0, None)
    assert figures["answersTotal"] == 100 and figures["errorsTotal"] == 1


def test_error_codes_are_counted_and_bounded() -> None:
    clock = Clock()
    activity = Activity(clock)
    for i in range(MAX_CODES + 5):
        clock.now += 1
        activity.failed(f"Code{i}")
    activity.failed("Code10")
    codes = activity.recent_errors(limit=100)
    assert len(codes) == MAX_CODES and codes[0] == {"code": "Code10", "count": 2,
                                                    "lastSecondsAgo": 0.0}
    assert "Code0" not in {c["code"] for c in codes}  # the oldest went first


def test_people_read_durations_and_sizes() -> None:
    assert human_duration(3 * 3600 + 12 * 60 + 5) == "3 h 12 min"
    assert human_duration(725) == "12 min 5 s" and human_duration(42.9) == "42 s"
    assert human_duration(3 * 86400 + 7200) == "3 d 2 h"
    assert human_bytes(999) == "999 B" and human_bytes(1_234_567) == "1.2 MiB"
