"""The documented broker configuration keeps acknowledged inputs over a broker kill -9.

A real mosquitto configured as simulator/broker.py and docs/mqtt-topics.md say
(autosave on every change, no queue limit) is killed with SIGKILL while a
publisher sends inputs and the module answers them, then restarted on the same
port with the same persistence file. Every input the broker acknowledged to
the publisher must be answered, and billing must hold one record per distinct
answer: nothing lost, nothing billed twice.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from simulator.billing import BillingSimulator
from simulator.datasets import digits_split
from tests.support import Broker, Module, digit_png, wait_until

INPUTS = 400  # bounded load: at most 400 inputs ...
RATE = 150.0  # ... at 150/s, the kill after about a third of them
KILL_AT = 130


class _Answers:
    """A subscriber with a persistent session, so answers sent while it reconnects wait."""

    def __init__(self, port: int) -> None:
        self.ids: set[str] = set()
        self.results: set[str] = set()
        self.lock = threading.Lock()
        self.client = mqtt.Client(client_id="durability-answers", protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.connect("127.0.0.1", port, keepalive=10, clean_start=False,
                            properties=props)
        self.client.loop_start()
        assert self.subscribed.wait(10), "the answer subscriber could not subscribe"

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe([("em/results", 1), ("em/errors", 1)])
        self.subscribed.set()

    def _on_message(self, _: mqtt.Client, __: Any, msg: mqtt.MQTTMessage) -> None:
        body = json.loads(msg.payload)
        with self.lock:
            self.ids.add(str(body.get("id")))
            if msg.topic == "em/results":
                self.results.add(str(body.get("id")))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_broker_kill_9_mid_load_loses_no_acknowledged_input(
    broker: Broker, start_module: Callable[..., Module], billing: BillingSimulator
) -> None:
    assert "autosave_on_changes true" in broker.conf.read_text()
    module = start_module("Metering:MaxDelaySeconds=1")
    answers = _Answers(broker.port)
    _, x_test, _, _ = digits_split()
    payloads = [json.dumps({"id": f"d-{i}", "image": base64.b64encode(
        digit_png(x_test[i % len(x_test)])).decode()}).encode() for i in range(INPUTS)]

    acked: set[str] = set()
    by_mid: dict[int, str] = {}
    lock = threading.Lock()

    def on_publish(_: mqtt.Client, __: Any, mid: int) -> None:
        with lock:
            if mid in by_mid:
                acked.add(by_mid[mid])

    sender = mqtt.Client(client_id="durability-sender", protocol=mqtt.MQTTv5)
    sender.on_publish = on_publish
    sender.reconnect_delay_set(0.1, 0.5)
    sender.connect("127.0.0.1", broker.port, keepalive=10)
    sender.loop_start()
    try:
        started = time.monotonic()
        for i, payload in enumerate(payloads):
            with lock:  # on_publish may fire before publish() returns
                info = sender.publish("em/in/cam", payload, qos=1)
                by_mid[info.mid] = f"d-{i}"
            if i == KILL_AT:
                broker.kill()
                broker.start()  # same port, same configuration, same persistence file
            delay = started + (i + 1) / RATE - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        # paho resends what the dead broker never acknowledged; give it a bounded while.
        wait_until(lambda: len(acked) == INPUTS, 30, f"all inputs acknowledged "
                   f"({len(acked)} of {INPUTS})")
        wait_until(lambda: acked <= answers.ids, 60,
                   "every acknowledged input answered; missing: "
                   f"{sorted(acked - answers.ids)[:10]}")
        distinct = len(answers.results)
        wait_until(lambda: billing.totals()["records"] >= distinct
                   and module.status()["backlog"]["pending"] == 0, 30,
                   f"the ledger drained ({billing.totals()['records']} of {distinct} billed)")
        time.sleep(1.5)  # a late duplicate would show up here
        assert billing.totals()["records"] == len(answers.results)
        assert module.metric("edge_module_ledger_pending_records") == 0
        assert broker.process is not None and broker.process.poll() is None
    finally:
        sender.disconnect()
        sender.loop_stop()
        answers.close()
