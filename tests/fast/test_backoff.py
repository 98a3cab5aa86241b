"""The uploader's back-off: exponential with full jitter, capped, reset on success."""

from __future__ import annotations

import random

from edge_module.metering.drain import Backoff


def test_backoff_grows_is_capped_and_jittered() -> None:
    backoff = Backoff(cap=8.0, base=1.0, rng=random.Random(4))
    ceilings = [min(8.0, 2.0 ** n) for n in range(12)]
    delays = [backoff.next() for _ in ceilings]
    assert all(0.05 <= d <= max(c, 0.05) for d, c in zip(delays, ceilings, strict=True))
    assert max(delays) <= 8.0
    assert len({round(d, 6) for d in delays}) > 6  # jitter: not a fixed schedule


def test_backoff_reset_starts_small_again() -> None:
    backoff = Backoff(cap=300.0, base=1.0, rng=random.Random(1))
    for _ in range(10):
        backoff.next()
    backoff.reset()
    assert backoff.next() <= 1.0


def test_backoff_never_busy_loops() -> None:
    backoff = Backoff(cap=0.001, base=0.0001, rng=random.Random(2))
    assert min(backoff.next() for _ in range(100)) >= 0.05
