"""The edgeHub transport against its reference, through the same fake edgeHub.

Reference: a plain paho client (TLS, like the SDK) subscribed to the module's
edgeHub inputs that republishes every payload to the module's outputs topic,
which is the least any module built on MQTT has to do. Module: edge-module
with ``Transport=edgehub`` (azure-iot-device 2.14) and metering on. Both are
fed the same way: a paho publisher keeps at most ``window`` inputs
unanswered and the fake edgeHub's responder counts what reaches the outputs.
"""

from __future__ import annotations

import os
import ssl
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edge_module.transport.paho_fix import apply as apply_paho_fix
from simulator.broker import free_port
from simulator.edgehub import FakeEdgeHub
from simulator.process import ModuleProcess, development_trust

apply_paho_fix()


def _tls_client(hub: FakeEdgeHub, name: str) -> mqtt.Client:
    client = mqtt.Client(client_id=name, protocol=mqtt.MQTTv311)
    client.tls_set(ca_certs=str(hub.certs.ca), tls_version=ssl.PROTOCOL_TLS_CLIENT)
    client.max_inflight_messages_set(1000)
    client.connect(hub.host, 8883)
    client.loop_start()
    return client


def _saturate(hub: FakeEdgeHub, payloads: list[bytes], count: int, window: int,
              timeout: float) -> dict[str, Any]:
    topic = f"devices/{hub.device_id}/modules/{hub.module_id}/inputs/input/"
    publisher = _tls_client(hub, "bench-edge-pub")
    base = len(hub.outputs)
    started = time.perf_counter()
    deadline = started + timeout
    sent = 0
    for i in range(count):
        while sent - (len(hub.outputs) - base) >= window and time.perf_counter() < deadline:
            time.sleep(0.0005)
        props = f"%24.mid=b{i}"
        publisher.publish(topic + props, payloads[i % len(payloads)], qos=1)
        sent += 1
    while len(hub.outputs) - base < sent and time.perf_counter() < deadline:
        time.sleep(0.002)
    elapsed = time.perf_counter() - started
    answered = len(hub.outputs) - base
    publisher.disconnect()
    publisher.loop_stop()
    return {"count": answered, "seconds": round(elapsed, 3),
            "perS": round(answered / elapsed, 1) if elapsed > 0 else 0.0,
            "unanswered": sent - answered}


def _echo(hub: FakeEdgeHub, payloads: list[bytes], count: int) -> dict[str, Any]:
    out = f"devices/{hub.device_id}/modules/{hub.module_id}/messages/events/%24.on=results"
    echoer = _tls_client(hub, "bench-edge-echo")

    def bounce(client: mqtt.Client, _: Any, msg: mqtt.MQTTMessage) -> None:
        client.publish(out, msg.payload, qos=1)

    echoer.on_message = bounce
    echoer.subscribe(f"devices/{hub.device_id}/modules/{hub.module_id}/inputs/#", qos=1)
    time.sleep(0.3)
    result = _saturate(hub, payloads, count, window=256, timeout=120)
    echoer.disconnect()
    echoer.loop_stop()
    return result


def edgehub_bench(work: Path, billing: str, key_file: Path, payloads: list[bytes],
                  count: int) -> dict[str, Any]:
    hub = FakeEdgeHub(work / "edgehub").start()
    try:
        echo = _echo(hub, payloads, count)
        hub.outputs.clear()
        http = free_port()
        process = ModuleProcess(
            ["Eula=accept", f"Billing={billing}", "ApiKey=bench-key-0123456789",
             development_trust(key_file), "Transport=edgehub", f"Http:Port={http}",
             f"Data:Path={work / 'data-edgehub'}", "Metering:MaxDelaySeconds=1",
             "Log:Level=warning", "EdgeHub:IntakeQueue=1024"],
            http, work / "module-edgehub.log", env={**os.environ, **hub.module_env()}).start()
        try:
            if not process.wait_ready(60):  # connected to the fake edgeHub and licensed
                raise RuntimeError(f"module not ready; see {process.log_path}")
            _saturate(hub, payloads, min(500, count), window=256, timeout=60)  # warm-up
            hub.outputs.clear()
            module = _saturate(hub, payloads, count, window=256, timeout=180)
        finally:
            process.stop(30)
        errors = sum(1 for m in hub.outputs if m.output == "errors")
        return {"echo": echo, "module": {**module, "errors": errors},
                "ratio": round(module["perS"] / echo["perS"], 3) if echo["perS"] else 0.0}
    finally:
        hub.stop()
