"""Real parts for tests: a mosquitto broker, the module as a process, a collecting client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
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

__all__ = ["IDENTITY", "Broker", "Collector", "Module", "digit_png", "free_port",
           "make_ledger", "start_broker", "wait_until"]

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


class Module:
    """The module as users run it: ``python -m edge_module run Key=Value ...``."""

    def __init__(self, workdir: Path, broker_port: int, *extra: str,
                 env: dict[str, str] | None = None, prefix: str = "em",
                 billing: str | None = "http://127.0.0.1:9/", api_key: str = API_KEY,
                 public_key: str | None = None) -> None:
        self.workdir = workdir
        self.http_port = free_port()
        self.prefix = prefix
        self.log_path = workdir / f"module-{self.http_port}.log"
        trust: list[str] = []
        if public_key:  # the simulator's key, trusted through the development switch
            key_file = workdir / f"trusted-key-{self.http_port}.b64"
            key_file.write_text(public_key + "\n")
            trust = [f"Development:TrustedKeyFile={key_file}"]
        self.args = [
            "Eula=accept", *([f"Billing={billing}", f"ApiKey={api_key}"] if billing else []),
            f"Mqtt:Port={broker_port}", f"Http:Port={self.http_port}",
            f"Data:Path={workdir / 'data'}",
            f"Mqtt:InputTopic={prefix}/in/#", f"Mqtt:ResultTopic={prefix}/results",
            f"Mqtt:ErrorTopic={prefix}/errors", f"Mqtt:AvailabilityTopic={prefix}/status",
            "Mqtt:ReconnectMaxDelay=1",
            *trust, *extra,
        ]
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True) -> Module:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edge_module", "run", *self.args],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir,
        )
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        wait_until(self.ready, timeout, f"module ready; log:\n{self.log_tail()}")

    def wait_serving_or_gated(self, timeout: float = 30) -> None:
        """Started and connected to the broker, whatever the licence decision."""
        def connected() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"module exited:\n{self.log_tail()}")
            status, body = self.http("/ready")
            return status == 200 or (status == 503 and b"unlicensed" in body)
        wait_until(connected, timeout, f"module connected; log:\n{self.log_tail()}")

    def status(self) -> dict[str, Any]:
        code, body = self.http("/status")
        assert code == 200, body
        return dict(json.loads(body))

    def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"module exited with {self.process.returncode}:\n"
                                 f"{self.log_tail()}")
        return self.http("/ready")[0] == 200

    def http(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}",
                                        timeout=2) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return 0, b""

    def metric(self, name: str, labels: str = "") -> float:
        status, body = self.http("/metrics")
        assert status == 200
        for line in body.decode().splitlines():
            if line.startswith(f"{name}{labels} ") or line.startswith(f"{name}{{{labels}}} "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait_exit(self, timeout: float = 15) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if hasattr(self, "_log"):
            self._log.close()


def digit_png(pixels: np.ndarray, fmt: str = ".png") -> bytes:
    return digit_image(pixels, fmt)


def simulator_keys(public_key_b64: str) -> TrustedKeys:
    """What a development build with ``Development:TrustedKeyFile`` trusts: one key."""
    return TrustedKeys([TrustedKey.of(load_public_key(public_key_b64))])
