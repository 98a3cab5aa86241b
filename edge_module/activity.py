"""Recent activity for people: each model's answers, latency and errors over the last
minutes, and the error codes answered lately with their counts (the status page shows them).

Bounded in every dimension: a per-second bucket ring of ``WINDOW_SECONDS`` per model, at most
``MAX_SAMPLES`` latency samples per model, ``MAX_MODELS`` models and ``MAX_CODES`` codes
(the oldest forgotten first). Written by the pipeline's decode, infer and commit threads,
read by the HTTP handler threads: one lock, held for a few dictionary updates.
Times are monotonic: windows and ages do not move when the wall clock is set.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

WINDOW_SECONDS = 300  # "the last minutes": five of them
MAX_SAMPLES = 4096  # latency samples kept per model (the newest)
MAX_MODELS = 64
MAX_CODES = 32

ModelKey = tuple[str, str]  # (name, version)


@dataclass
class _ModelWindow:
    first_seen: float
    last_seen: float = 0.0
    seconds: deque[list[int]] = field(default_factory=deque)  # [second, answers, errors]
    latencies: deque[tuple[float, float]] = field(
        default_factory=lambda: deque(maxlen=MAX_SAMPLES))  # (when, ms)
    answers_total: int = 0
    errors_total: int = 0

    def bucket(self, now: float) -> list[int]:
        second = int(now)
        if not self.seconds or self.seconds[-1][0] != second:
            self.seconds.append([second, 0, 0])
        self.prune(now)
        return self.seconds[-1]

    def prune(self, now: float) -> None:
        while self.seconds and self.seconds[0][0] <= now - WINDOW_SECONDS:
            self.seconds.popleft()
        while self.latencies and self.latencies[0][0] <= now - WINDOW_SECONDS:
            self.latencies.popleft()


@dataclass
class _CodeCount:
    count: int
    last: float


def _percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of sorted values."""
    index = max(0, min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1))
    return ordered[index]


class Activity:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._models: dict[ModelKey, _ModelWindow] = {}
        self._codes: dict[str, _CodeCount] = {}

    def _window(self, key: ModelKey, now: float) -> _ModelWindow:
        window = self._models.get(key)
        if window is None:
            if len(self._models) >= MAX_MODELS:  # forget the one idle the longest
                del self._models[min(self._models, key=lambda k: self._models[k].last_seen)]
            window = self._models[key] = _ModelWindow(now)
        window.last_seen = now
        return window

    def answered(self, key: ModelKey, total_ms: float) -> None:
        """One result sent for model ``key``, ``total_ms`` after the input arrived."""
        now = self._clock()
        with self._lock:
            window = self._window(key, now)
            window.bucket(now)[1] += 1
            window.latencies.append((now, total_ms))
            window.answers_total += 1

    def failed(self, code: str, key: ModelKey | None = None) -> None:
        """One error answered with ``code`` (counted for the model too, when known)."""
        now = self._clock()
        with self._lock:
            if key is not None:
                window = self._window(key, now)
                window.bucket(now)[2] += 1
                window.errors_total += 1
            entry = self._codes.get(code)
            if entry is None:
                if len(self._codes) >= MAX_CODES:
                    del self._codes[min(self._codes, key=lambda c: self._codes[c].last)]
                entry = self._codes[code] = _CodeCount(0, now)
            entry.count += 1
            entry.last = now

    def models(self) -> dict[ModelKey, dict[str, Any]]:
        """Per model: answers and errors in the window, answers per second, p50/p99 (ms)."""
        now = self._clock()
        out: dict[ModelKey, dict[str, Any]] = {}
        with self._lock:
            for key, window in self._models.items():
                window.prune(now)
                answers = sum(b[1] for b in window.seconds)
                errors = sum(b[2] for b in window.seconds)
                span = max(1.0, min(float(WINDOW_SECONDS), now - window.first_seen))
                ordered = sorted(ms for _, ms in window.latencies)
                out[key] = {
                    "answers": answers, "errors": errors,
                    "answersPerSecond": round(answers / span, 3),
                    "p50Ms": round(_percentile(ordered, 0.50), 3) if ordered else None,
                    "p99Ms": round(_percentile(ordered, 0.99), 3) if ordered else None,
                    "answersTotal": window.answers_total, "errorsTotal": window.errors_total,
                }
        return out

    def recent_errors(self, limit: int = 8) -> list[dict[str, Any]]:
        """The codes answered most recently first: code, count since start, seconds since."""
        now = self._clock()
        with self._lock:
            items = sorted(self._codes.items(), key=lambda kv: kv[1].last, reverse=True)
            return [{"code": code, "count": entry.count,
                     "lastSecondsAgo": round(max(0.0, now - entry.last), 1)}
                    for code, entry in items[:limit]]
