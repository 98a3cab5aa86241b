"""The supervisor: keeps the module's worker threads alive (owned by ``App``).

Every long-lived worker (drain, licensing, commit, infer, decode, reporter,
usage log) is started with ``Supervisor.spawn``. Each worker catches its own
errors, logs them with a cause and a fix, backs off and continues; if one
still ends (an exception that escaped, or its loop returned while the module
is not stopping), the supervisor logs ``thread_died`` with the cause, marks
the worker down (``down()``: ``/ready`` turns false and names it), waits a
short back-off (0.1 s doubling up to ``MAX_RESTART_DELAY``) and runs the
worker's loop again on the same thread. ``edge_module_thread_restarts_total``
counts the restarts by thread. After ``stop()`` a worker that returns is left
alone: that is the normal end of a loop at shutdown.

Threads created by a library (paho's network loops) are supervised from the
inside: their body runs under ``Supervisor.run`` with ``restart_on_return``
off (the library returns only when told to stop).

Components also take a plain ``start_thread`` (or ``run_here``) so they run
without a supervisor (tools, tests).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from edge_module.logs import get_logger
from edge_module.metrics import Metrics

log = get_logger("supervisor")

Spawn = Callable[[str, Callable[[], None]], threading.Thread]
Keep = Callable[[str, Callable[[], None]], None]  # run a loop here, restarting it
MAX_RESTART_DELAY = 5.0
FIRST_RESTART_DELAY = 0.1
STABLE_SECONDS = 60.0  # a worker that ran this long starts again from the first delay


def start_thread(name: str, target: Callable[[], None]) -> threading.Thread:
    """An unsupervised daemon thread (for use without a supervisor)."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


def run_here(name: str, target: Callable[[], None]) -> None:
    """Run ``target`` once on the calling thread (for use without a supervisor)."""
    target()


class Supervisor:
    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._down: dict[str, str] = {}
        self.threads: list[threading.Thread] = []

    def spawn(self, name: str, target: Callable[[], None]) -> threading.Thread:
        """Run ``target`` on a daemon thread named ``name``, restarting it if it dies."""
        thread = threading.Thread(target=self.run, args=(name, target), name=name,
                                  daemon=True)
        thread.start()
        self.threads.append(thread)
        return thread

    def down(self) -> dict[str, str]:
        """Workers dead and waiting for their restart, with the cause."""
        with self._lock:
            return dict(self._down)

    def stop(self) -> None:
        """From now on a worker that returns has finished: no restart."""
        self._stopping.set()

    def keep_library_loop(self, name: str, target: Callable[[], None]) -> None:
        """``run`` for a library's loop: it returns only when told to stop."""
        self.run(name, target, restart_on_return=False)

    def run(self, name: str, target: Callable[[], None],
            restart_on_return: bool = True) -> None:
        """Run ``target`` on the calling thread until it ends for good."""
        failures = 0
        while True:
            started = time.monotonic()
            try:
                target()
            except BaseException as exc:  # the point of a supervisor: nothing escapes
                if self._stopping.is_set():
                    log.warning("thread_failed_at_shutdown", thread=name,
                                error=f"{type(exc).__name__}: {exc}")
                    return
                cause = f"{type(exc).__name__}: {exc}"
                log.exception("thread_died", thread=name, error=cause)
            else:
                if self._stopping.is_set() or not restart_on_return:
                    return
                cause = "its loop returned while the module is running"
            if time.monotonic() - started > STABLE_SECONDS:
                failures = 0
            wait = min(MAX_RESTART_DELAY, FIRST_RESTART_DELAY * 2 ** failures)
            failures += 1
            with self._lock:
                self._down[name] = cause
            log.error("thread_down", thread=name, error=cause, restart_in_s=wait,
                      effect="/ready is false until the thread runs again",
                      fix="none needed if it recovers; if thread_died repeats, report "
                      "the logged traceback")
            if self._stopping.wait(wait):
                return
            with self._lock:
                self._down.pop(name, None)
            if self.metrics is not None:
                self.metrics.thread_restarts.labels(thread=name).inc()
            log.info("thread_restarted", thread=name, restarts=failures)
