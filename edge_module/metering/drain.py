"""The uploader: drains pending usage records to the billing endpoint, oldest first.

* Uploads when a full batch is pending or the oldest pending record is older
  than ``Metering:MaxDelaySeconds``; after a success it continues at once
  while records remain, so a backlog drains at full speed.
* A record settles only under a signed receipt that verifies
  (metering/receipts.py); the receipt is kept with it in the ledger. An
  unsigned or foreign "Accepted" settles nothing (counted in
  ``edge_module_drain_unverified_answers``): the records are offered again.
* ``Accepted`` and ``Duplicate`` both mean delivered: the endpoint
  deduplicates by record id, so a resend after a crash or a lost answer never
  bills twice. ``Rejected`` is quarantined with its reason unless the result
  says ``retryable``; a whole-batch 400 is bisected so one poison record
  cannot block the rest.
* Failures back off exponentially with full jitter, capped at
  ``Metering:MaxBackoffSeconds``; a ``Retry-After`` is honoured exactly. The
  thread sleeps on an event while idle or backing off: no busy loop.
* Every call has a timeout and runs on this thread only, so a blackholed
  endpoint never stalls inference.
* Nothing stops the thread: an error of the ledger (a full disk while
  settling), of the lease store or a bug is logged with its cause and a fix
  and retried with the same back-off; records not settled stay pending and
  are sent again (the endpoint answers Duplicate, never bills twice). The
  supervisor (``edge_module/supervisor.py``) restarts the thread if it dies
  anyway.
* After uploads the ledger's WAL is checkpointed and truncated (at most every
  ``CHECKPOINT_SECONDS``, and whenever the backlog is empty).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from edge_module.billing_api import Answer, ApiStatus, BillingClient
from edge_module.config import MeteringSettings
from edge_module.logs import get_logger
from edge_module.metering.ledger import ACCEPTED, DUPLICATE, Ledger, PendingRecord
from edge_module.metering.receipts import Receipt, check_receipt
from edge_module.metrics import Metrics
from edge_module.supervisor import Spawn, start_thread
from edge_module.trust.keys import TrustedKeys

log = get_logger("drain")

BASE_BACKOFF = 1.0
CHECKPOINT_SECONDS = 5.0


@dataclass
class BatchOutcome:
    delivered: int = 0
    duplicates: int = 0
    quarantined: int = 0
    answer: Answer | None = None

    @property
    def ok(self) -> bool:
        return self.answer is not None and self.answer.ok


class Backoff:
    """Exponential back-off with full jitter: uniform(0, min(cap, base * 2**n))."""

    def __init__(self, cap: float, base: float = BASE_BACKOFF,
                 rng: random.Random | None = None) -> None:
        self.cap = cap
        self.base = base
        self.failures = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        ceiling = min(self.cap, self.base * (2 ** self.failures))
        self.failures += 1
        return max(0.05, self._rng.uniform(0, ceiling))

    def reset(self) -> None:
        self.failures = 0


class Drainer:
    def __init__(self, ledger: Ledger, client: BillingClient, settings: MeteringSettings,
                 metrics: Metrics | None = None,
                 on_answer: Callable[[Answer], None] | None = None,
                 keys: TrustedKeys | None = None) -> None:
        self.ledger = ledger
        self.keys = keys if keys is not None else TrustedKeys()
        self.client = client
        self.settings = settings
        self.metrics = metrics
        self.on_answer = on_answer
        # The longest a record may wait for upload: MaxDelaySeconds, or less when the
        # licence needs usage uploaded sooner (the app wires it).
        self.max_delay: Callable[[], float] = lambda: settings.max_delay_seconds
        self.backoff = Backoff(settings.max_backoff_seconds)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one batch at a time (thread, CLI, direct method)
        self.last_answer: Answer | None = None
        self.next_attempt: float = 0.0  # monotonic time of the next try while backing off
        self._told_to_wait = False  # next_attempt is the endpoint's own Retry-After
        self._last_prune = 0.0
        self._last_checkpoint = 0.0
        self._dirty = False  # settled something since the last checkpoint

    # -- lifecycle --------------------------------------------------------

    def start(self, spawn: Spawn = start_thread) -> None:
        self._thread = spawn("drain", self.run)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        """Ask for an upload now (after commits, on DrainNow, when the link returns).

        Cuts a back-off short, but never a Retry-After the endpoint asked for: a status
        check that passes while uploads are answered Busy must not hammer it."""
        if not (self._told_to_wait and time.monotonic() < self.next_attempt):
            self.next_attempt = 0.0
        self._wake.set()

    def notify_committed(self) -> None:
        if self.ledger.pending >= self.settings.batch_size:
            self._wake.set()

    # -- the loop ---------------------------------------------------------

    def run(self) -> None:
        """The thread's body (the supervisor runs it; ``start`` for standalone use)."""
        while not self._stop.is_set():
            try:
                self._step()
            except Exception as exc:  # a full disk, a bug: log, back off, carry on
                wait = self.backoff.next()
                self.next_attempt = time.monotonic() + wait
                log.error("drain_loop_error", error=f"{type(exc).__name__}: {exc}",
                          retry_in_s=round(wait, 3), pending=self.ledger.pending,
                          effect="records not settled stay pending and are sent again "
                          "(answered Duplicate, never billed twice)",
                          fix="free space under Data:Path if the disk is full; otherwise "
                          "report this log line")

    def _step(self) -> None:
        delay = self._due_in()
        if delay > 0:
            self._maybe_checkpoint()
            self._wake.wait(delay)
            self._wake.clear()
            return
        outcome = self.drain_batch()
        if outcome.delivered or outcome.quarantined:
            self._dirty = True
        if time.monotonic() - self._last_prune > 600:
            self._last_prune = time.monotonic()
            self.ledger.prune()
        self._maybe_checkpoint()
        if outcome.ok:
            self.backoff.reset()
            return
        self._schedule_retry(outcome.answer)

    def _maybe_checkpoint(self) -> None:
        """Keep the WAL small: truncate it after uploads (rate-limited)."""
        if not self._dirty:
            return
        now = time.monotonic()
        if self.ledger.pending and now - self._last_checkpoint < CHECKPOINT_SECONDS:
            return
        self._last_checkpoint = now
        if self.ledger.checkpoint():
            self._dirty = False

    def _due_in(self) -> float:
        """Seconds until the next upload is due (0: now)."""
        now = time.monotonic()
        if now < self.next_attempt:
            return self.next_attempt - now
        pending = self.ledger.pending
        max_delay = self.max_delay()
        if pending == 0:
            return max_delay
        if pending >= self.settings.batch_size:
            return 0.0
        oldest = self.ledger.oldest_pending_ms()
        if oldest is None:
            return max_delay
        # requestTime is trusted time: compare with the ledger's clock, not the wall clock
        # (a wall clock behind trusted time would hold a small backlog back by the skew).
        age = (self.ledger.clock_ms() - oldest) / 1000
        return max(0.0, max_delay - age)

    def _schedule_retry(self, answer: Answer | None) -> None:
        if answer is None:
            return
        if answer.retry_after is not None and answer.status in (ApiStatus.BUSY,
                                                                 ApiStatus.OUT_OF_QUOTA):
            wait = answer.retry_after  # honoured exactly, no jitter
            self._told_to_wait = True
        else:
            wait = self.backoff.next()
            self._told_to_wait = False
        self.next_attempt = time.monotonic() + wait
        log.warning("drain_failed", status=str(answer.status), http=answer.http_status,
                    error=answer.error, retry_in_s=round(wait, 3),
                    pending=self.ledger.pending)

    # -- one batch ------------------------------------------------------

    def drain_batch(self) -> BatchOutcome:
        with self._lock:
            batch = self.ledger.pending_batch(self.settings.batch_size)
            if not batch:
                return BatchOutcome(answer=Answer(ApiStatus.VALID))
            return self._upload(batch)

    def _upload(self, batch: list[PendingRecord]) -> BatchOutcome:
        started = time.perf_counter()
        answer = self.client.post_raw_usage([r.body for r in batch])
        receipt: Receipt | None = None
        if answer.http_status in (200, 400):
            answer, receipt = self._verify(answer, batch)
        self.last_answer = answer
        if self.on_answer is not None:
            self.on_answer(answer)
        if self.metrics is not None:
            self.metrics.drain_seconds.observe(time.perf_counter() - started)
        if answer.http_status == 400 and len(batch) > 1:
            # The endpoint refused the whole batch: bisect to isolate the poison record.
            half = len(batch) // 2
            first = self._upload(batch[:half])
            second = self._upload(batch[half:])
            return BatchOutcome(first.delivered + second.delivered,
                                first.duplicates + second.duplicates,
                                first.quarantined + second.quarantined,
                                second.answer if first.ok else first.answer)
        if answer.http_status == 400:
            if receipt is None or batch[0].id not in receipt.rejected:
                return BatchOutcome(answer=Answer(  # an unsigned 400 may not discard a record
                    ApiStatus.UNKNOWN, 400, answer.body,
                    error=f"HTTP 400 without a signed rejection: {answer.error}"))
            reason = f"HTTP 400: {receipt.rejected[batch[0].id]}"
            self.ledger.settle([], quarantined=[(batch[0].seq, reason)], receipt=receipt.raw)
            self._count_quarantine(batch[0].id, reason)
            return BatchOutcome(quarantined=1, answer=Answer(ApiStatus.VALID))
        if not answer.ok:
            if self.metrics is not None:
                self.metrics.drain_failures.labels(status=str(answer.status)).inc()
            return BatchOutcome(answer=answer)
        assert receipt is not None  # answer.ok: _verify proved it
        return self._apply(batch, answer, receipt)

    def _verify(self, answer: Answer,
                batch: list[PendingRecord]) -> tuple[Answer, Receipt | None]:
        """The answer marked proven with its verified receipt, or downgraded to Unknown.

        A receipt proves the endpoint (and so the licence) only when it answers for
        records of this very upload: a genuine receipt replayed from an earlier upload
        names none of them, settles nothing and proves nothing.
        """
        receipt, problem = check_receipt(answer.body, self.keys,
                                         self.ledger.identity.container_id,
                                         int(time.time() * 1000))
        if receipt is not None:
            ids = {record.id for record in batch}
            named = ids & (set(receipt.accepted) | set(receipt.duplicate) |
                           set(receipt.rejected))
            if named:
                answer.proven = answer.ok
                return answer, receipt
            problem = "the receipt names none of the records of this upload (a replay)"
        if answer.http_status == 400:
            return answer, None
        if self.metrics is not None:
            self.metrics.drain_unverified.inc()
        log.warning("usage_receipt_rejected", reason=problem, effect="nothing settles; the "
                    "records stay pending and are offered again",
                    fix="check that Billing points at the vendor's endpoint (not a look-alike "
                    "or a proxy that answers for it)")
        return Answer(ApiStatus.UNKNOWN, answer.http_status, answer.body, answer.retry_after,
                      f"a 200 upload answer without a valid receipt: {problem}",
                      answer.server_date, answer.elapsed), None

    def _apply(self, batch: list[PendingRecord], answer: Answer,
               receipt: Receipt) -> BatchOutcome:
        delivered: list[tuple[int, int]] = []
        quarantined: list[tuple[int, str]] = []
        retried: list[int] = []
        duplicates = 0
        for record in batch:
            if record.id in receipt.accepted:
                delivered.append((record.seq, ACCEPTED))
            elif record.id in receipt.duplicate:
                delivered.append((record.seq, DUPLICATE))
                duplicates += 1
            elif record.id in receipt.rejected:
                reason = receipt.rejected[record.id]
                quarantined.append((record.seq, reason))
                self._count_quarantine(record.id, reason)
            else:  # unanswered, or Rejected with retryable: offered again
                retried.append(record.seq)
        self.ledger.settle(delivered, quarantined, retried, receipt=receipt.raw)
        self.backoff.reset()
        if self.metrics is not None:
            self.metrics.drain_acknowledged.inc(len(delivered) - duplicates)
            self.metrics.drain_duplicates.inc(duplicates)
            self.metrics.last_drain.set(time.time())
        if retried:
            log.warning("drain_partial", retried=len(retried),
                        effect="records without a definite answer are sent again")
            return BatchOutcome(len(delivered), duplicates, len(quarantined),
                                Answer(ApiStatus.UNKNOWN, 200, error="some records unanswered"))
        return BatchOutcome(len(delivered), duplicates, len(quarantined), answer)

    def _count_quarantine(self, record_id: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.drain_quarantined.inc()
        log.error("usage_record_quarantined", record=record_id, reason=reason,
                  effect="kept in the ledger, never retried; see `edge-module ledger`")

    # -- on demand (CLI, DrainNow) ---------------------------------------

    def drain_all(self, deadline: float,
                  progress: Callable[[int, int], None] | None = None) -> BatchOutcome:
        """Upload until nothing is pending, a call fails, or ``deadline`` (monotonic)."""
        total = BatchOutcome(answer=Answer(ApiStatus.VALID))
        start_pending = self.ledger.pending
        while self.ledger.pending and time.monotonic() < deadline:
            outcome = self.drain_batch()
            total.delivered += outcome.delivered
            total.duplicates += outcome.duplicates
            total.quarantined += outcome.quarantined
            total.answer = outcome.answer
            if progress is not None:
                progress(start_pending - self.ledger.pending, start_pending)
            if not outcome.ok:
                break
        return total
