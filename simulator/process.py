"""The module as a child process: one way to start it, wait until it serves, read it, stop it.

The tests (tests/support.py), the benchmarks (bench/run.py, bench/edgehub.py)
and ``make run`` (simulator/demo.py) all start ``python -m edge_module run
...`` and wait for ``/ready``; this is the one copy of that. It knows nothing
of brokers or billing: callers pass the settings. ``development_trust`` gives
the development switch that makes a source checkout trust the billing
simulator's key (a release image refuses it; docs/licensing.md).

Runs in the caller's thread; every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO

from simulator.broker import free_port

MODULE = ("-m", "edge_module", "run")


def development_trust(public_key_file: Path) -> str:
    """The setting that trusts the billing simulator's key in a development build."""
    return f"Development:TrustedKeyFile={public_key_file}"


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """``GET http://127.0.0.1:<port><path>``: (status, body); (0, b"") when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as reply:
            return int(reply.status), reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def _given(settings: list[str], env: dict[str, str] | None, key: str) -> str | None:
    """The value of ``key`` the module takes: the last ``Key=Value`` setting, else the
    environment's ``Section__Key`` (both case-insensitive)."""
    found = [s.partition("=")[2] for s in settings
             if s.partition("=")[0].strip().lower() == key.lower()]
    if found:
        return found[-1]
    name = key.replace(":", "__").lower()
    return next((v for k, v in (env or {}).items() if k.lower() == name), None)


class ModuleProcess:
    """One module process with its log file; ``http_port`` is the module's Http:Port.

    gRPC is on by default on 8001 (``Grpc:Port``), which two modules on one machine
    cannot share: unless the caller names ``Grpc:Port`` or ``Grpc:Enabled``, the module
    gets a free loopback port (``grpc_port``; 0 when gRPC is off)."""

    def __init__(self, settings: list[str], http_port: int, log_path: Path, *,
                 env: dict[str, str] | None = None, cwd: Path | None = None,
                 entry: tuple[str, ...] = MODULE, new_session: bool = False,
                 preexec_fn: Callable[[], None] | None = None) -> None:
        port, enabled = _given(settings, env, "Grpc:Port"), _given(settings, env, "Grpc:Enabled")
        if enabled is not None and enabled.strip().lower() in ("false", "0", "no", "off"):
            self.grpc_port = 0
        elif port is not None and port.strip().isdigit():
            self.grpc_port = int(port)
        else:  # first, so a caller's own Grpc:Host still wins
            self.grpc_port = free_port()
            settings = ["Grpc:Host=127.0.0.1", f"Grpc:Port={self.grpc_port}", *settings]
        self.settings = settings
        self.http_port = http_port
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.entry = entry
        self.new_session = new_session  # a terminal's Ctrl-C reaches the caller only
        self.preexec_fn = preexec_fn
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> ModuleProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, *self.entry, *self.settings], stdout=self._log,
            stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
            start_new_session=self.new_session, preexec_fn=self.preexec_fn)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def exited(self) -> int | None:
        assert self.process is not None, "not started"
        return self.process.poll()

    def http(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        return http_get(self.http_port, path, timeout)

    def ready(self) -> bool:
        return self.http("/ready")[0] == 200

    def wait_ready(self, timeout: float = 60, stop: threading.Event | None = None) -> bool:
        """True once ``/ready`` answers 200; False when the process exits, ``stop`` is set
        or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            if self.exited() is not None:
                return False
            if self.ready():
                return True
            time.sleep(0.1)
        return False

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def status_value(self, key: str) -> int | None:
        """A ``Key:`` line of /proc/<pid>/status in kB or count (VmHWM, VmRSS, Threads)."""
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return None

    def peak_rss_mb(self) -> float:
        kib = self.status_value("VmHWM")
        return round(kib / 1024, 1) if kib is not None else float("nan")

    def cpu_seconds(self) -> float:
        """utime + stime of the module and its direct children (replicas)."""
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                pid = int(stat.parent.name)
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, ValueError):
                continue
            if pid == self.pid or int(fields[1]) == self.pid:
                total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def signal(self, sig: int) -> None:
        assert self.process is not None, "not started"
        self.process.send_signal(sig)

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(5)
            code = self.process.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return code
