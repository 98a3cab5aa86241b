"""Real parts for tests: a mosquitto broker, the module as a process, a collecting client."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edge_module import CONTAINER_TYPE, __version__
from edge_module.config import MeteringSettings
from edge_module.identity import Identity
from edge_module.metering.ledger import Ledger
from edge_module.trust.keys import TrustedKey, TrustedKeys
from edge_module.trust.signing import load_public_key
from simulator.broker import Broker, BrokerMissing, free_port
from simulator.datasets import digit_image
from simulator.process import ModuleProcess, development_trust

__all__ = ["IDENTITY", "Broker", "Collector", "Module", "digit_png", "free_port",
           "ledger_records", "make_ledger", "start_broker", "wait_until"]

IDENTITY = Identity(CONTAINER_TYPE, __version__, "00000000-0000-4000-8000-00000000test")


def make_ledger(path: Path, identity: Identity = IDENTITY, **settings: object) -> Ledger:
    """A real ledger file with the given Metering:* settings (``BatchSize=10``, ...)."""
    return Ledger(path, identity, MeteringSettings.model_validate(settings))


def start_broker(workdir: Path) -> Broker:
    try:
        return Broker(workdir).start()
    except BrokerMissing as exc:
        pytest.fail(str(exc), pytrace=False)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


API_KEY = "test-api-key-1234567890"


class Collector:
    """A paho client that subscribes to topics and keeps every message it gets."""

    def __init__(self, port: int, topics: Iterable[str], protocol: int = mqtt.MQTTv5) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self._lock = threading.Lock()
        self.topics = list(topics)
        self.client = mqtt.Client(client_id=f"collector-{free_port()}", protocol=protocol)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self._subscribed = threading.Event()
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise AssertionError("collector could not subscribe")

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe([(t, 1) for t in self.topics])
        self._subscribed.set()

    def _on_message(self, _: mqtt.Client, __: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(msg)

    def on(self, topic: str) -> list[mqtt.MQTTMessage]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def json(self, topic: str) -> list[dict[str, Any]]:
        return [json.loads(m.payload) for m in self.on(topic)]

    def wait(self, topic: str, count: int, timeout: float = 15) -> list[dict[str, Any]]:
        wait_until(lambda: len(self.on(topic)) >= count, timeout,
                   f"{count} messages on {topic} (have {len(self.on(topic))})")
        return self.json(topic)

    def publish(self, topic: str, payload: bytes, qos: int = 1,
                properties: Any = None) -> None:
        info = self.client.publish(topic, payload, qos=qos, properties=properties)
        if qos:
            info.wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Module(ModuleProcess):
    """The module as users run it (``python -m edge_module run Key=Value ...``), wired to a
    test's broker and topics; simulator/process.py starts, waits for and stops it."""

    def __init__(self, workdir: Path, broker_port: int, *extra: str,
                 env: dict[str, str] | None = None, prefix: str = "em",
                 billing: str | None = "http://127.0.0.1:9/", api_key: str = API_KEY,
                 public_key: str | None = None) -> None:
        http_port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.prefix = prefix
        trust: list[str] = []
        if public_key:  # the simulator's key, trusted through the development switch
            key_file = workdir / f"trusted-key-{http_port}.b64"
            key_file.write_text(public_key + "\n")
            trust = [development_trust(key_file)]
        self.args = [
            "Eula=accept", *([f"Billing={billing}", f"ApiKey={api_key}"] if billing else []),
            f"Mqtt:Port={broker_port}", f"Http:Port={http_port}",
            f"Data:Path={workdir / 'data'}",
            f"Mqtt:InputTopic={prefix}/in/#", f"Mqtt:ResultTopic={prefix}/results",
            f"Mqtt:ErrorTopic={prefix}/errors", f"Mqtt:AvailabilityTopic={prefix}/status",
            "Mqtt:ReconnectMaxDelay=1",
            *trust, *extra,
        ]
        super().__init__(self.args, http_port, workdir / f"module-{http_port}.log",
                         env={**os.environ, **(env or {})}, cwd=workdir)

    def start(self, wait_ready: bool = True) -> Module:
        super().start()
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30, stop: threading.Event | None = None) -> bool:
        """Like ModuleProcess.wait_ready, but a timeout fails the test with the log."""
        wait_until(self.ready, timeout, f"module ready; log:\n{self.log_tail()}")
        return True

    def wait_serving_or_gated(self, timeout: float = 30) -> None:
        """Started and connected to the broker, whatever the licence decision."""
        def connected() -> bool:
            if self.exited() is not None:
                raise AssertionError(f"module exited:\n{self.log_tail()}")
            status, body = self.http("/ready")
            return status == 200 or (status == 503 and b"unlicensed" in body)
        wait_until(connected, timeout, f"module connected; log:\n{self.log_tail()}")

    def status(self) -> dict[str, Any]:
        code, body = self.http("/status")
        assert code == 200, body
        return dict(json.loads(body))

    def ready(self) -> bool:
        code = self.exited()
        if code is not None:
            raise AssertionError(f"module exited with {code}:\n{self.log_tail()}")
        return super().ready()

    def metric(self, name: str, labels: str = "") -> float:
        status, body = self.http("/metrics")
        assert status == 200
        for line in body.decode().splitlines():
            if line.startswith(f"{name}{labels} ") or line.startswith(f"{name}{{{labels}}} "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def wait_exit(self, timeout: float = 15) -> int:
        assert self.process is not None
        return self.process.wait(timeout)


def ledger_records(module: Module) -> int:
    """The usage records in the module's ledger file, read-only beside the running module
    (WAL lets a reader in while it writes): what the module billed, uploaded or not."""
    path = module.workdir / "data" / "ledger.db"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True,
                                            timeout=10)) as conn:
        return int(conn.execute("SELECT count(*) FROM records").fetchone()[0])


def digit_png(pixels: np.ndarray, fmt: str = ".png") -> bytes:
    return digit_image(pixels, fmt)


def simulator_keys(public_key_b64: str) -> TrustedKeys:
    """What a development build with ``Development:TrustedKeyFile`` trusts: one key."""
    return TrustedKeys([TrustedKey.of(load_public_key(public_key_b64))])


@dataclass
class ServedRepository:
    """One module serving a model repository over MQTT (topic level 2 names the model),
    HTTP and gRPC, with its broker, billing simulator and a result collector: what a
    module-scoped fixture shares between a file's tests (``serve_repository``)."""

    module: Module
    collector: Collector
    billing: Any  # simulator.billing.BillingSimulator
    grpc_port: int

    def billed(self) -> int:
        return int(self.billing.totals()["records"])

    def results(self, prefix: str, topic: str = "em/results") -> list[dict[str, Any]]:
        return [r for r in self.collector.json(topic) if str(r["id"]).startswith(prefix)]

    def errors(self, prefix: str, topic: str = "em/errors") -> dict[str, str]:
        return {e["id"]: e["error"]["code"] for e in self.collector.json(topic)
                if str(e["id"]).startswith(prefix)}


@contextlib.contextmanager
def serve_repository(root: Path, repository: Path, *settings: str,
                     default: str = "pair") -> Iterator[ServedRepository]:
    """Start a broker, the billing simulator and a module on ``repository`` (``settings``
    added to the shared ones), and stop them all afterwards."""
    from simulator.billing import BillingSimulator, KeyInfo

    (root / "broker").mkdir(parents=True, exist_ok=True)
    broker = start_broker(root / "broker")
    billing = BillingSimulator(root / "billing.db", keys={API_KEY: KeyInfo()})
    billing.start()
    grpc_port = free_port()
    module = Module(root / "module", broker.port, f"Model:Repository={repository}",
                    f"Model:Default={default}", "Mqtt:ModelTopicLevel=2",
                    "Grpc:Enabled=true", f"Grpc:Port={grpc_port}",
                    "Metering:MaxDelaySeconds=0.2", "Metering:MaxBackoffSeconds=1",
                    "Metering:TimeoutSeconds=2", *settings,
                    billing=billing.url, public_key=billing.public_key_b64)
    collector = Collector(broker.port, ["em/results", "em/errors"])
    try:
        module.start()
        yield ServedRepository(module, collector, billing, grpc_port)
    finally:
        collector.close()
        module.stop()
        billing.stop()
        broker.stop()
