"""Child processes that never outlive the tool that started them (Linux).

Used by ``make run`` (simulator/demo.py) for the broker, the module and the
publisher, which run in the main thread of the demo:

* ``die_with_parent(sig)`` is a ``preexec_fn`` that asks the kernel
  (``prctl(PR_SET_PDEATHSIG)``) to send ``sig`` to the child when its parent
  dies, even by SIGKILL. It is a no-op where prctl does not exist.
* ``ParentWatch`` notices, from the demo's side, that the process that started
  it is gone or is being stopped: GNU make forwards SIGTERM to its children but
  not SIGINT (it expects the terminal to have sent SIGINT to the whole process
  group), and then waits for them, so ``kill -INT <make's pid>`` alone used to
  leave everything running. make resets a fatal signal's handler to the default
  before it waits, which /proc/<pid>/status shows as the signal leaving
  ``SigCgt``; the watch reports that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
from collections.abc import Callable
from pathlib import Path

PR_SET_PDEATHSIG = 1
_libc_name = ctypes.util.find_library("c")
_libc = ctypes.CDLL(_libc_name, use_errno=True) if _libc_name else None
_prctl = getattr(_libc, "prctl", None)


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``sig`` when the process that forked it dies."""
    prctl = _prctl  # looked up before fork: the child only makes the call

    def preexec() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)

    return preexec


def caught_signals(pid: int) -> set[int] | None:
    """The signals ``pid`` has a handler for, from /proc (None where /proc is absent)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("SigCgt:"):
            mask = int(line.split()[1], 16)
            return {n for n in range(1, 65) if mask & (1 << (n - 1))}
    return None


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class ParentWatch:
    """Is the process that started us still there, and not on its way out?"""

    WATCHED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.parent = os.getppid()
        self.name = process_name(self.parent)
        caught = caught_signals(self.parent) or set()
        # Only make is known to drop its handler when it gets one of these; a shell's
        # handlers come and go with its jobs, so for anything else only death counts.
        self.handled = {s for s in self.WATCHED if s in caught} \
            if self.name in ("make", "gmake") else set()

    def gone(self) -> str | None:
        """Why we should stop (the parent died or is stopping), or None."""
        if os.getppid() != self.parent:
            return f"the parent process {self.parent} ({self.name or '?'}) exited"
        if not self.handled:
            return None
        caught = caught_signals(self.parent)
        if caught is None:
            return None
        dropped = self.handled - caught
        if dropped:
            names = ", ".join(signal.Signals(s).name for s in sorted(dropped))
            return f"the parent process {self.parent} ({self.name or '?'}) got {names}"
        return None
