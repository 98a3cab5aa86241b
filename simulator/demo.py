"""`make run`: a broker, the billing simulator, the module and the publisher, all local.

Everything listens on loopback only and lives under ``.run/`` in the checkout.
Ctrl-C (SIGINT), SIGTERM, SIGHUP, ``kill -INT``/``kill -TERM`` of the ``make``
that started it, or the death of whatever started it, all stop everything in
order: the publisher, then the module (which finishes its work in flight and
publishes ``offline``), then the broker and the billing simulator. No process
and no listening port is left behind: the children are also told by the kernel
to stop should this process die without a chance to clean up
(simulator/lifecycle.py). Runs in the main thread; the billing simulator runs
in a thread of this process.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from simulator.billing import BillingSimulator, KeyInfo
from simulator.broker import Broker, BrokerMissing, free_port
from simulator.lifecycle import ParentWatch, die_with_parent
from simulator.process import ModuleProcess, development_trust

RUN_DIR = Path(".run")
DEMO_KEY = "demo-key-0123456789abcdef"


class Stop(Exception):
    """A signal asked us to stop."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulator.demo",
        description="Run the broker, the billing simulator, the module and the publisher "
        "locally (what `make run` does).")
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR,
                        help="folder for logs, the ledger and the broker's data (default .run)")
    parser.add_argument("--http-port", type=int, default=None,
                        help="the module's HTTP port (default 5000, or a free one if taken)")
    parser.add_argument("--grpc-port", type=int, default=None,
                        help="the module's gRPC port (default 8001, or a free one if taken)")
    parser.add_argument("--rate", type=float, default=20,
                        help="digit images per second the publisher sends (default 20)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = threading.Event()
    reason: list[str] = []

    def on_signal(signum: int, _: FrameType | None) -> None:
        if not stop.is_set():
            reason.append(signal.Signals(signum).name)
            stop.set()
            raise Stop()  # leaves whatever wait the main thread is in

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    watch = ParentWatch()
    try:
        return _run(args, stop, reason, watch)
    except Stop:
        return 0


def _run(args: argparse.Namespace, stop: threading.Event, reason: list[str],
         watch: ParentWatch) -> int:
    run_dir: Path = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    module: ModuleProcess | None = None
    publisher: subprocess.Popen[bytes] | None = None
    broker: Broker | None = None
    billing: BillingSimulator | None = None
    billed_before = 0
    left_before: int | None = 0
    try:
        try:
            broker = Broker(run_dir / "broker").start(die_with_parent=True)
        except BrokerMissing as exc:
            print(exc, file=sys.stderr)
            return 1
        billing = BillingSimulator(run_dir / "billing.db", keys={DEMO_KEY: KeyInfo()}).start()
        billed_before = billing.totals()["records"]  # the simulator's store outlives runs
        left_before = _pending(run_dir / "data")  # answered in an earlier run, not billed
        http_port = args.http_port or (5000 if _free(5000) else free_port())
        grpc_port = args.grpc_port or (8001 if _free(8001) else free_port())
        module = ModuleProcess(
            ["Eula=accept", f"Billing={billing.url}", f"ApiKey={DEMO_KEY}",
             f"Mqtt:Port={broker.port}", f"Http:Port={http_port}", f"Grpc:Port={grpc_port}",
             f"Data:Path={run_dir / 'data'}", "Log:Format=console",
             "Metering:MaxDelaySeconds=2", development_trust(billing.public_key_path)],
            http_port, run_dir / "module.log",
            new_session=True,  # Ctrl-C reaches us only; we stop the module in order
            preexec_fn=die_with_parent(signal.SIGTERM)).start()
        if not module.wait_ready(60, stop):
            if stop.is_set():
                return 0
            print(f"the module did not become ready; see {run_dir / 'module.log'}",
                  file=sys.stderr)
            return 1
        print(f"broker   127.0.0.1:{broker.port} (mosquitto, log in {broker.log})")
        print(f"module   http://127.0.0.1:{http_port}/metrics  /ready  /health "
              f"(log in {run_dir / 'module.log'})")
        print(f"gRPC     127.0.0.1:{grpc_port} (Open Inference Protocol v2, docs/oip-v2.md)")
        print(f"billing  {billing.url}/admin/usage (simulator; switch faults with POST "
              f"{billing.url}/admin/fault {{\"mode\": \"busy\"}})")
        print(f"backlog  .venv/bin/edge-module ledger Data:Path={run_dir / 'data'}")
        print(f"watch    mosquitto_sub -p {broker.port} -t 'edge-module/#' -v")
        print(f"publisher: digit images at {args.rate:g}/s; Ctrl-C stops everything\n",
              flush=True)
        publisher = subprocess.Popen(
            [sys.executable, "-m", "simulator.publisher", f"--port={broker.port}",
             f"--rate={args.rate}", "--count=0"],
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        while publisher.poll() is None and not stop.is_set():
            why = watch.gone()
            if why is not None:
                reason.append(why)
                break
            stop.wait(0.5)
    except Stop:
        pass
    finally:
        stop.set()  # a second signal during the clean-up changes nothing
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if reason:
            print(f"\nstopping ({reason[0]})", flush=True)
        _shutdown(publisher, signal.SIGINT, 20)
        code = _shutdown(module.process if module else None, signal.SIGTERM, 30)
        if module is not None:
            module.stop()  # closes its log
        if broker is not None:
            broker.stop()
        if billing is not None:
            billed = billing.totals()["records"] - billed_before
            billing.stop()
            pending = _pending(run_dir / "data")
            if pending is None:
                backlog = "; see the backlog with the ledger command above"
            elif pending:
                backlog = f"; {pending} answered but not billed yet (uploaded on the next run)"
            else:
                backlog = "; nothing left to bill"
            if left_before:
                backlog += f"; the last run had left {left_before} to bill"
            print(f"\nmodule exited with {code}; billed {billed} transactions in this run"
                  f"{backlog}; broker and billing simulator stopped", flush=True)
    return 0


def _shutdown(process: subprocess.Popen[bytes] | None, sig: int, timeout: float) -> int | None:
    """Ask ``process`` to stop with ``sig``; SIGKILL it if it has not after ``timeout``."""
    if process is None:
        return None
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"pid {process.pid} did not stop within {timeout:g} s: killing it",
                  file=sys.stderr)
            process.kill()
            process.wait(5)
    return process.returncode


def _pending(data: Path) -> int | None:
    """Records the module metered but has not uploaded yet (its ledger CLI)."""
    if not (data / "ledger.db").exists():
        return 0
    proc = subprocess.run([sys.executable, "-m", "edge_module", "ledger", f"Data:Path={data}",
                           "--json"], capture_output=True, text=True, timeout=60)
    try:
        body: dict[str, Any] = json.loads(proc.stdout)
        return int(body["pending"])
    except (ValueError, KeyError, TypeError):
        return None


def _free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
