"""`make run` / `python -m simulator.demo` stop cleanly: no process and no port left behind.

The demo is started for real (broker, billing simulator, module, publisher), then
stopped the three ways a user or a machine stops it: SIGTERM to the demo, SIGINT
to make's PID alone, and the demo dying by SIGKILL (its children must follow).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from tests.support import free_port, wait_until

REPO = Path(__file__).resolve().parent.parent
PORTS = re.compile(r"^(?:broker\s+127\.0\.0\.1:(\d+)|module\s+http://127\.0\.0\.1:(\d+)/"
                   r"|billing\s+http://127\.0\.0\.1:(\d+)/|gRPC\s+127\.0\.0\.1:(\d+) )")


class Demo:
    def __init__(self, command: list[str], cwd: Path) -> None:
        self.process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self.started = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            self.lines.append(line)
            if line.startswith("publisher:"):
                self.started.set()

    def wait_started(self, timeout: float = 90) -> None:
        """Until the module has answered some of the publisher's inputs."""
        if not self.started.wait(timeout):
            self.process.kill()
            raise AssertionError("the demo did not start:\n" + "\n".join(self.lines[-30:]))
        metrics = f"http://127.0.0.1:{self.ports()[1]}/metrics"
        wait_until(lambda: _answered(metrics) >= 20, 60, "20 answers")

    def ports(self) -> list[int]:
        found = []
        for line in self.lines:
            match = PORTS.match(line)
            if match:
                found += [int(g) for g in match.groups() if g]
        assert len(found) == 4, self.lines  # broker, HTTP, gRPC, billing
        return found

    def text(self) -> str:
        return "\n".join(self.lines)


def _answered(url: str) -> float:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            text = reply.read().decode()
    except OSError:
        return 0.0
    found = re.search(r"^edge_module_results_published_total (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> set[int]:
    tree, out, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def assert_all_gone(pids: set[int], ports: list[int], timeout: float, demo: Demo) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = {p for p in pids if alive(p)}
        open_ports = [p for p in ports if listening(p)]
        if not left and not open_ports:
            return
        time.sleep(0.2)
    names = {p: Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ")[:120]
             for p in left if alive(p)}
    for p in left:  # do not leave them to the next test
        os.kill(p, signal.SIGKILL)
    raise AssertionError(f"left behind: processes {names}, listening ports {open_ports}\n"
                         + demo.text()[-2000:])


def _command(tmp_path: Path) -> list[str]:
    return [sys.executable, "-m", "simulator.demo", "--run-dir", str(tmp_path / "run"),
            "--http-port", str(free_port()), "--grpc-port", str(free_port()), "--rate", "40"]


def test_sigterm_stops_every_child_and_frees_every_port(tmp_path: Path) -> None:
    pending_before = 0
    for run in (1, 2):  # the second run reuses .run: its count must be its own
        demo = Demo(_command(tmp_path), REPO)
        demo.wait_started()
        children = descendants(demo.process.pid)
        assert len(children) >= 3, children  # mosquitto, the module, the publisher
        ports = demo.ports()
        demo.process.send_signal(signal.SIGTERM)
        assert demo.process.wait(60) == 0
        assert_all_gone(children, ports, 10, demo)
        text = demo.text()
        assert "stopping (SIGTERM)" in text and "module exited with 0" in text
        answered = re.search(r"sent (\d+), answered (\d+) in", text)
        billed = re.search(r"billed (\d+) transactions in this run; (?:nothing left to bill|"
                           r"(\d+) answered but not billed yet)", text)
        assert answered is not None and billed is not None, text[-1500:]
        assert int(answered.group(1)) == int(answered.group(2)) > 0, run
        left = re.search(r"the last run had left (\d+) to bill", text)
        assert (left is None) == (pending_before == 0), text[-800:]
        # What this run billed plus what it leaves equals its answers plus what it found.
        pending = int(billed.group(2) or 0)
        assert int(billed.group(1)) + pending == int(answered.group(2)) + pending_before, run
        pending_before = pending


def test_sigint_to_make_alone_stops_everything(tmp_path: Path) -> None:
    args = " ".join(_command(tmp_path)[3:])
    make = Demo(["make", "--no-print-directory", "-C", str(REPO), "run", f"RUN_ARGS={args}"],
                REPO)
    make.wait_started()
    children = descendants(make.process.pid)
    ports = make.ports()
    os.kill(make.process.pid, signal.SIGINT)  # make's PID only, not its process group
    make.process.wait(60)
    assert_all_gone(children, ports, 10, make)
    assert "stopping (the parent process" in make.text() and "got SIGINT" in make.text()


def test_children_stop_when_the_demo_dies(tmp_path: Path) -> None:
    demo = Demo(_command(tmp_path), REPO)
    demo.wait_started()
    children = descendants(demo.process.pid)
    ports = demo.ports()
    demo.process.kill()  # no clean-up possible: the kernel tells the children
    demo.process.wait(10)
    ports.remove(ports[2])  # the billing simulator was a thread of the demo: gone with it
    assert_all_gone(children, ports, 40, demo)


def test_make_run_needs_only_what_it_runs() -> None:
    def dry(target: str) -> str:
        proc = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(REPO), target],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    run = dry("run")
    assert "mosquitto" in run and "simulator.demo" in run
    assert "buildah" not in run and "debootstrap" not in run
    assert "buildah" in dry("test")  # the image test runs in make test
