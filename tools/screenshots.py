"""``make screenshots``: docs/status-page-{online,grace,gated}.png, the status page in each
licence state, taken from a real module.

The set-up is the browser test's: mosquitto, the billing simulator behind the fault proxy,
the module as a process, traffic on its input topic (with a few bad inputs, so the error
table has rows), and Debian's chromium through Playwright. Online first; then the link is
cut while the lease grants a few hours (grace, with the backlog growing); then the link
returns, a short lease is taken, and the link is cut until that lease ends (gated).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from playwright.sync_api import Page

from simulator.billing import BillingSimulator, KeyInfo
from simulator.broker import Broker, free_port
from simulator.browser import open_page
from simulator.faultproxy import FaultProxy
from simulator.process import ModuleProcess, development_trust

DOCS = Path(__file__).resolve().parent.parent / "docs"
KEY = "screenshot-key-0123456789"
WAIT_MS = 30_000


def _traffic(port: int, stop: threading.Event, rate: float = 20.0) -> None:
    client = mqtt.Client(client_id=f"screenshots-{free_port()}", protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    sent = 0
    try:
        while not stop.wait(1 / rate):
            sent += 1
            payload = b"not json {" if sent % 97 == 0 else json.dumps(
                {"id": f"shot-{sent}", "tensor": [[[float(sent % 7)] * 8] * 8]}).encode()
            client.publish("em/in/line-1", payload, qos=1)
    finally:
        client.loop_stop()
        client.disconnect()


def _wait_state(page: Page, state: str) -> None:
    page.wait_for_function(
        "s => document.getElementById('state-box').classList.contains('state-' + s)",
        arg=state, timeout=WAIT_MS)


def _shot(page: Page, out: Path, name: str) -> None:
    time.sleep(2.5)  # one more refresh, so every figure is from the same moment
    path = out / f"status-page-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DOCS)
    parser.add_argument("--width", type=int, default=900)
    parser.add_argument("--online-only", action="store_true",
                        help="stop after the first picture (e.g. --width 375 for a phone)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edge-module-shots-") as tmp:
        work = Path(tmp)
        (work / "broker").mkdir()
        broker = Broker(work / "broker").start()
        billing = BillingSimulator(work / "billing.db", keys={KEY: KeyInfo()}).start()
        billing.state.lease.grace_seconds = 3 * 3600 + 12 * 60 + 30
        proxy = FaultProxy(billing.port).start()
        http_port = free_port()
        module = ModuleProcess(
            ["Eula=accept", f"Billing={proxy.url}", f"ApiKey={KEY}",
             f"Mqtt:Port={broker.port}", f"Http:Port={http_port}",
             f"Data:Path={work / 'data'}", "Mqtt:InputTopic=em/in/#",
             "Mqtt:ResultTopic=em/results", "Mqtt:ErrorTopic=em/errors",
             "Licensing:CheckIntervalSeconds=1", "Licensing:RetrySeconds=0.5",
             "Licensing:StatusTimeoutSeconds=1", "Metering:MaxDelaySeconds=0.5",
             "Metering:MaxBackoffSeconds=1", development_trust(billing.public_key_path)],
            http_port, work / "module.log", cwd=work).start()
        stop = threading.Event()
        traffic = threading.Thread(target=_traffic, args=(broker.port, stop), daemon=True)
        try:
            if not module.wait_ready(60):
                raise SystemExit(f"the module did not start:\n{module.log_tail()}")
            traffic.start()
            with open_page(args.width, 700) as (page, console):
                page.goto(f"http://127.0.0.1:{http_port}/")
                _wait_state(page, "online")
                time.sleep(6)  # a few seconds of answers for the model figures
                _shot(page, args.out, "online")
                if args.online_only:
                    return 0

                proxy.cut()
                _wait_state(page, "grace")
                time.sleep(5)  # the backlog grows while the link is cut
                _shot(page, args.out, "grace")

                billing.state.lease.grace_seconds = 4
                proxy.restore()
                _wait_state(page, "online")
                time.sleep(3)  # a fresh, short lease
                proxy.cut()
                _wait_state(page, "gated")
                time.sleep(3)  # refusals reach the error table
                _shot(page, args.out, "gated")
                if console.errors:
                    raise SystemExit("the page logged errors: " + "; ".join(console.errors))
        finally:
            stop.set()
            if traffic.is_alive():
                traffic.join(5)
            module.stop()
            proxy.stop()
            billing.stop()
            broker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
