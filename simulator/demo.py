"""`make run`: a broker, the billing simulator, the module and the publisher, all local.

Everything listens on loopback only and lives under ``.run/`` in the checkout.
Ctrl-C stops the publisher, then the module (which finishes its work in flight
and publishes ``offline``), then the broker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from simulator.billing import BillingSimulator, KeyInfo
from simulator.broker import Broker, BrokerMissing, free_port

RUN_DIR = Path(".run")


def wait_ready(port: int, module: subprocess.Popen[bytes], timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if module.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as reply:
                if reply.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def main() -> int:
    RUN_DIR.mkdir(exist_ok=True)
    try:
        broker = Broker(RUN_DIR / "broker").start()
    except BrokerMissing as exc:
        print(exc, file=sys.stderr)
        return 1
    billing = BillingSimulator(RUN_DIR / "billing.db", keys={"demo-key": KeyInfo()}).start()
    http_port = 5000 if _free(5000) else free_port()
    module_log = open(RUN_DIR / "module.log", "ab")  # noqa: SIM115 - closed below
    module = subprocess.Popen(
        [sys.executable, "-m", "edge_module", "run", "Eula=accept",
         f"Billing={billing.url}", "ApiKey=demo-key", f"Mqtt:Port={broker.port}",
         f"Http:Port={http_port}", f"Data:Path={RUN_DIR / 'data'}", "Log:Format=console",
         "Metering:MaxDelaySeconds=2", f"Development:TrustedKeyFile={billing.public_key_path}"],
        stdout=module_log, stderr=subprocess.STDOUT,
        start_new_session=True,  # Ctrl-C reaches us only; we stop the module in order
    )
    publisher: subprocess.Popen[bytes] | None = None
    try:
        if not wait_ready(http_port, module):
            print(f"the module did not become ready; see {RUN_DIR / 'module.log'}",
                  file=sys.stderr)
            return 1
        print(f"broker   127.0.0.1:{broker.port} (mosquitto, log in {broker.log})")
        print(f"module   http://127.0.0.1:{http_port}/metrics  /ready  /health "
              f"(log in {RUN_DIR / 'module.log'})")
        print(f"billing  {billing.url}/admin/usage (simulator; switch faults with POST "
              f"{billing.url}/admin/fault {{\"mode\": \"busy\"}})")
        print(f"backlog  .venv/bin/edge-module ledger Data:Path={RUN_DIR / 'data'}")
        print(f"watch    mosquitto_sub -p {broker.port} -t 'edge-module/#' -v")
        print("publisher: digit images at 20/s; Ctrl-C stops everything\n")
        publisher = subprocess.Popen(
            [sys.executable, "-m", "simulator.publisher", f"--port={broker.port}",
             "--rate=20", "--count=0"],
        )
        publisher.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if publisher is not None and publisher.poll() is None:
            publisher.send_signal(signal.SIGINT)
            publisher.wait(20)
        module.send_signal(signal.SIGTERM)
        code = module.wait(20)
        module_log.close()
        broker.stop()
        totals = billing.totals()
        billing.stop()
        print(f"\nmodule exited with {code}; billed {totals['records']} transactions "
              f"(quantity {totals['quantity']}); broker and billing simulator stopped")
    return 0


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
