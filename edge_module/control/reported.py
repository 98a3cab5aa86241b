"""Reported twin properties: sent when they change, at most every ``interval`` seconds.

Frequent reported-property patches make azure-iot-device's memory grow, so
the module's state (licence, backlog, model) is sampled every second and
patched only when it changed and the last patch is older than the interval.
Answers to desired-property changes (``push``) go out at once: an operator
waits for them. A failed patch is retried with the next sample.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from edge_module.logs import get_logger
from edge_module.supervisor import Spawn, start_thread

log = get_logger("reported")


class Reporter:
    def __init__(self, send: Callable[[dict[str, Any]], bool],
                 snapshot: Callable[[], dict[str, Any]], interval: float) -> None:
        self.send = send
        self.snapshot = snapshot
        self.interval = interval
        self._sent: dict[str, Any] = {}
        self._last = float("-inf")
        self._urgent: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.patches = 0

    def start(self, spawn: Spawn = start_thread) -> None:
        self._thread = spawn("reported", self.run)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)

    def push(self, patch: dict[str, Any]) -> None:
        """Send ``patch`` as soon as possible (not rate-limited)."""
        with self._lock:
            self._urgent.append(patch)
        self._wake.set()

    def resend_all(self) -> None:
        """After a reconnect: the next sample is sent whole, as soon as allowed."""
        with self._lock:
            self._sent = {}
        self._wake.set()

    def run(self) -> None:
        """The reporter thread: an error in one round is logged, the next round runs."""
        while not self._stop.is_set():
            try:
                self._round()
            except Exception as exc:  # a bug must not stop reporting
                log.exception("reported_round_failed", error=f"{type(exc).__name__}: {exc}",
                              fix="report this log line; reporting continues")
            self._wake.wait(min(1.0, max(0.05, self.interval)))
            self._wake.clear()

    def _round(self) -> None:
        with self._lock:
            urgent, self._urgent = self._urgent, []
        for patch in urgent:
            if self.send(patch):
                self.patches += 1
            else:
                with self._lock:
                    self._urgent.insert(0, patch)
                break
        try:
            state = self.snapshot()
        except Exception as exc:  # a bug must not stop reporting
            log.exception("reported_snapshot_failed", error=str(exc))
            state = {}
        changed = {k: v for k, v in state.items() if self._sent.get(k) != v}
        now = time.monotonic()
        if changed and now - self._last >= self.interval:
            if self.send(changed):
                self.patches += 1
                self._sent.update(changed)
            self._last = now
