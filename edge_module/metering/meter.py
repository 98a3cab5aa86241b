"""The pipeline's meter: records each answered transaction in the ledger.

Adapts ``Ledger`` to the pipeline's ``Meter`` protocol, wakes the uploader
when a full batch is pending, and times group commits.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from edge_module.exceptions import Refusal
from edge_module.metering.drain import Drainer
from edge_module.metering.ledger import Ledger
from edge_module.metering.records import MeterSpec, Usage
from edge_module.metrics import Metrics


class LedgerMeter:
    def __init__(self, ledger: Ledger, metrics: Metrics,
                 drainer: Drainer | None = None) -> None:
        self.ledger = ledger
        self.metrics = metrics
        self.drainer = drainer

    def admit(self, wanted: int) -> int:
        return self.ledger.admit(wanted)

    def release(self, count: int) -> None:
        self.ledger.release(count)

    def buffer_full(self) -> Refusal:
        return self.ledger.buffer_full()

    def commit(self, spec: MeterSpec, usages: Sequence[Usage]) -> list[str]:
        started = time.perf_counter()
        ids = self.ledger.append(spec, usages)
        self.metrics.ledger_commit_seconds.observe(time.perf_counter() - started)
        if self.drainer is not None:
            self.drainer.notify_committed()
        return ids

    def replayed(self, key: str, digest: bytes, within_ms: int | None = None) -> str | None:
        return self.ledger.replayed(key, digest, within_ms)

    def replayed_many(self, deliveries: Sequence[tuple[str, bytes]],
                      within_ms: int | None = None) -> dict[tuple[str, bytes], str]:
        return self.ledger.replayed_many(deliveries, within_ms)
