"""A local mosquitto on a free loopback port, for tests, `make run` and benchmarks.

The configuration is the one a production broker feeding this module should
have (docs/mqtt-topics.md, "Broker configuration"):

* ``persistence true``: sessions and queued QoS 1 messages survive a restart.
* ``autosave_on_changes true`` with ``autosave_interval 1``: the in-memory
  database is written after every change instead of every 30 minutes (the
  default), so a broker killed with SIGKILL (a crash, the OOM killer) comes back
  with the inputs it had acknowledged. With the default, a kill -9 under load
  loses every input acknowledged since the last save (all 2,000 of 2,000 queued
  inputs in our measurement; 351 of 2,000 with the module consuming).
* ``max_queued_messages 0``: no per-client queue limit. A limit makes mosquitto
  drop inputs for a module that is down or slow after it acknowledged them to
  the sender.

``durable=False`` keeps mosquitto's default autosave (every 1800 s) for a
measurement of the broker's cost.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from simulator import lifecycle

INSTALL_HINT = (
    "mosquitto is not installed. Install it with 'make install' (it uses apt-get) or "
    "'sudo apt-get install mosquitto' (Fedora: 'dnf install mosquitto', macOS: "
    "'brew install mosquitto')."
)


# mosquitto.conf lines that keep acknowledged QoS 1 messages over a kill -9 (see above).
DURABLE = (
    "autosave_on_changes true\n"
    "autosave_interval 1\n"
    "max_queued_messages 0\n"
    "log_type error\nlog_type warning\nlog_type notice\n"  # not a line per save
)


class BrokerMissing(RuntimeError):
    """mosquitto is not installed."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto")
    if found is None and os.access("/usr/sbin/mosquitto", os.X_OK):
        found = "/usr/sbin/mosquitto"
    if found is None:
        raise BrokerMissing(INSTALL_HINT)
    return found


class Broker:
    def __init__(self, workdir: Path, port: int | None = None, host: str = "127.0.0.1",
                 tls: tuple[Path, Path] | None = None,
                 users: dict[str, str] | None = None, extra: str = "",
                 durable: bool = True) -> None:
        """``tls``: (certificate chain, key) for a TLS listener; ``users``: name -> password
        (anonymous access is then refused); ``extra``: more mosquitto.conf lines."""
        self.workdir = workdir
        self.host = host
        self.port = port or free_port(host)
        self.log = workdir / "mosquitto.log"
        self.conf = workdir / "mosquitto.conf"
        (workdir / "persist").mkdir(parents=True, exist_ok=True)
        security = "allow_anonymous true\n"
        if users:
            passwd = workdir / "passwd"
            passwd.write_text("".join(f"{u}:{p}\n" for u, p in users.items()))
            subprocess.run([str(Path(mosquitto_binary()).with_name("mosquitto_passwd"))
                            if Path(mosquitto_binary()).with_name("mosquitto_passwd").exists()
                            else "mosquitto_passwd", "-U", str(passwd)], check=True)
            security = f"allow_anonymous false\npassword_file {passwd}\n"
        if tls is not None:
            security += f"certfile {tls[0]}\nkeyfile {tls[1]}\n"
        # Started as root, mosquitto drops to the `mosquitto` user and then cannot write its
        # log and persistence, nor read a private key, in folders we own: stay who we are.
        self.conf.write_text(
            f"user {getpass.getuser()}\n"
            f"listener {self.port} {host}\n"
            + security +
            "persistence true\n"
            f"persistence_location {workdir / 'persist'}/\n"
            + (DURABLE if durable else "max_queued_messages 100000\n") +
            "max_inflight_messages 0\n"
            "set_tcp_nodelay true\n"
            f"log_dest file {self.log}\n"
            + extra
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10, die_with_parent: bool = False) -> Broker:
        """``die_with_parent``: the kernel stops mosquitto if this process dies (Linux)."""
        self.process = subprocess.Popen(
            [mosquitto_binary(), "-c", str(self.conf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C meant for its owner must not kill it first
            preexec_fn=lifecycle.die_with_parent() if die_with_parent else None,
        )
        deadline = time.monotonic() + timeout
        while not self._accepts():
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self._log_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not listen on {self.port}: {self._log_text()}")
            time.sleep(0.02)
        return self

    def _log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def _accepts(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: what a crash or power loss looks like to the module."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
