"""The fake edgeHub: a TLS mosquitto speaking IoT Hub's MQTT topics, plus a responder.

What the module's SDK sees is what it sees on an IoT Edge device:

* a broker on port 8883 (the SDK hard-codes it) at the gateway host name, with
  a server certificate whose SAN is that name, signed by a CA that the
  workload API hands out as the trust bundle;
* persistence on, saved on every change, because the SDK does not
  resubscribe after a reconnect and relies on the broker's session (the
  module resubscribes itself; ``restart_broker(forget_sessions=True)`` is
  edgeHub recreated without its store);
* a responder (one paho client subscribed to ``$iothub/#`` and to module
  outputs) that answers twin GET and reported-property PATCH, pushes desired
  property patches, calls direct methods and records every output message.

Each hub takes its own loopback address (127.0.0.x), since the port is fixed.
Inputs are sent the way edgeHub routes them:
``devices/{device}/modules/{module}/inputs/{input}/{properties}``.
"""

from __future__ import annotations

import json
import random
import secrets
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import paho.mqtt.client as mqtt

from edge_module.transport.paho_fix import apply as apply_paho_fix
from simulator.broker import Broker
from simulator.certs import make_server_cert
from simulator.edgehub.workload import WorkloadApi

EDGE_PORT = 8883
apply_paho_fix()  # the responder must survive edgeHub restarts too


def free_loopback_address() -> str:
    """A 127.0.0.x address whose port 8883 is free (x between 2 and 254)."""
    candidates = list(range(2, 255))
    random.shuffle(candidates)
    for last in candidates:
        host = f"127.0.0.{last}"
        with socket.socket() as sock:
            try:
                sock.bind((host, EDGE_PORT))
            except OSError:
                continue
            return host
    raise RuntimeError("no loopback address has port 8883 free")


@dataclass
class OutputMessage:
    """A message the module sent to one of its outputs."""

    output: str
    body: bytes
    message_id: str | None
    correlation_id: str | None
    content_type: str | None
    content_encoding: str | None
    properties: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)


def _properties(segment: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in segment.split("&"):
        if not pair:
            continue
        key, _, value = pair.partition("=")
        out[unquote(key)] = unquote(value)
    return out


def _query(topic: str) -> dict[str, str]:
    return _properties(topic.partition("?")[2].lstrip("?"))


class FakeEdgeHub:
    def __init__(self, workdir: Path, device_id: str = "edge-device-1",
                 module_id: str = "edge-module", hub_host: str = "fake-hub.azure-devices.net",
                 host: str | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.device_id = device_id
        self.module_id = module_id
        self.hub_host = hub_host
        self.host = host or free_loopback_address()
        self.generation_id = uuid.uuid4().hex[:12]
        self.key = secrets.token_bytes(32)
        self.certs = make_server_cert(workdir / "certs", [self.host])
        self.broker = Broker(workdir / "broker", port=EDGE_PORT, host=self.host,
                             tls=(self.certs.cert, self.certs.key),
                             extra="autosave_on_changes true\nautosave_interval 1\n")
        self.workload = WorkloadApi(workdir / "workload.sock", self.certs.ca.read_text(),
                                    module_id, self.generation_id, self.key)
        self.desired: dict[str, Any] = {}
        self.desired_version = 1
        self.reported: dict[str, Any] = {}
        self.reported_version = 1
        self.reported_patches: list[dict[str, Any]] = []
        self.twin_gets = 0
        self.outputs: list[OutputMessage] = []
        self._changed = threading.Condition()
        self._method_answers: dict[str, tuple[int, Any]] = {}
        self._client = mqtt.Client(client_id=f"fake-edgehub-{uuid.uuid4().hex[:8]}",
                                   clean_session=False, protocol=mqtt.MQTTv311)
        self._client.tls_set(ca_certs=str(self.certs.ca), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(0.1, 1)
        self._client.max_inflight_messages_set(1000)
        self._connected = threading.Event()

    # -- lifecycle --------------------------------------------------------

    def start(self, timeout: float = 10) -> FakeEdgeHub:
        self.broker.start(timeout)
        self.workload.start()
        self._client.connect_async(self.host, EDGE_PORT, keepalive=5)
        self._client.loop_start()
        if not self._connected.wait(timeout):
            raise RuntimeError(f"the fake edgeHub's responder could not connect to {self.host}")
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self.workload.stop()
        self.broker.stop()

    def kill_broker(self) -> None:
        """SIGKILL edgeHub's broker: what a crash of edgeHub looks like to the module."""
        self._connected.clear()
        self.broker.kill()

    def stop_broker(self) -> None:
        """SIGTERM edgeHub's broker: a restart (``iotedge restart edgeHub``, an update).

        A real edgeHub writes every message it acknowledges to its store first;
        mosquitto saves its database only now and then, so a SIGKILL can lose
        messages it had acknowledged. Tests that count every message stop it this way.
        """
        self._connected.clear()
        self.broker.stop()

    def restart_broker(self, timeout: float = 10, forget_sessions: bool = False) -> None:
        if forget_sessions:
            for path in (self.broker.workdir / "persist").iterdir():
                path.unlink()
        self.broker.start(timeout)
        if not self._connected.wait(timeout):
            raise RuntimeError("the fake edgeHub's responder did not reconnect")

    def module_env(self) -> dict[str, str]:
        """The environment the IoT Edge runtime gives the module's container."""
        return {
            "IOTEDGE_IOTHUBHOSTNAME": self.hub_host,
            "IOTEDGE_DEVICEID": self.device_id,
            "IOTEDGE_MODULEID": self.module_id,
            "IOTEDGE_GATEWAYHOSTNAME": self.host,
            "IOTEDGE_MODULEGENERATIONID": self.generation_id,
            "IOTEDGE_WORKLOADURI": self.workload.uri,
            "IOTEDGE_APIVERSION": WorkloadApi.API_VERSION,
            "IOTEDGE_AUTHSCHEME": "sasToken",
        }

    def connection_string_env(self) -> dict[str, str]:
        """The local-debugging alternative: a connection string and the CA file."""
        import base64
        cs = (f"HostName={self.hub_host};DeviceId={self.device_id};ModuleId={self.module_id};"
              f"SharedAccessKey={base64.b64encode(self.key).decode()};"
              f"GatewayHostName={self.host}")
        return {"EdgeHubConnectionString": cs, "EdgeModuleCACertificateFile": str(self.certs.ca)}

    # -- the responder ----------------------------------------------------

    def _on_connect(self, client: mqtt.Client, _: Any, flags: Any, rc: int) -> None:
        if rc != 0:
            return
        base = f"devices/{self.device_id}/modules/{self.module_id}"
        client.subscribe([("$iothub/#", 1), (f"{base}/messages/events/#", 1)])
        self._connected.set()

    def _publish(self, topic: str, body: Any) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self._client.publish(topic, data, qos=1)

    def _on_message(self, client: mqtt.Client, _: Any, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        if topic.startswith("$iothub/twin/GET/"):
            with self._changed:
                self.twin_gets += 1
                twin = {"desired": {**self.desired, "$version": self.desired_version},
                        "reported": {**self.reported, "$version": self.reported_version}}
            self._publish(f"$iothub/twin/res/200/?$rid={_query(topic)['$rid']}", twin)
        elif topic.startswith("$iothub/twin/PATCH/properties/reported/"):
            patch = json.loads(msg.payload or b"{}")
            with self._changed:
                _merge(self.reported, patch)
                self.reported_version += 1
                self.reported_patches.append(patch)
                version = self.reported_version
                self._changed.notify_all()
            self._publish(f"$iothub/twin/res/204/?$rid={_query(topic)['$rid']}"
                          f"&$version={version}", b"")
        elif topic.startswith("$iothub/methods/res/"):
            status = int(topic.split("/")[3])
            body = json.loads(msg.payload) if msg.payload else None
            with self._changed:
                self._method_answers[_query(topic)["$rid"]] = (status, body)
                self._changed.notify_all()
        elif "/messages/events/" in topic:
            props = _properties(topic.split("/messages/events/", 1)[1].strip("/"))
            out = OutputMessage(
                output=props.pop("$.on", ""), body=msg.payload,
                message_id=props.pop("$.mid", None), correlation_id=props.pop("$.cid", None),
                content_type=props.pop("$.ct", None), content_encoding=props.pop("$.ce", None),
                properties=props)
            with self._changed:
                self.outputs.append(out)
                self._changed.notify_all()

    # -- what tests and the operator do ------------------------------------

    def send_input(self, input_name: str, payload: bytes, message_id: str | None = None,
                   correlation_id: str | None = None, content_type: str | None = None,
                   properties: dict[str, str] | None = None) -> None:
        """Route ``payload`` to the module's ``input_name``, as an edgeHub route would."""
        pairs = []
        if message_id is not None:
            pairs.append(("$.mid", message_id))
        if correlation_id is not None:
            pairs.append(("$.cid", correlation_id))
        if content_type is not None:
            pairs.append(("$.ct", content_type))
        pairs.extend((properties or {}).items())
        segment = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs)
        topic = (f"devices/{self.device_id}/modules/{self.module_id}/inputs/"
                 f"{quote(input_name, safe='')}/{segment}")
        info = self._client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=10)

    def patch_desired(self, patch: dict[str, Any]) -> int:
        """Change desired properties (null removes one) and push the patch to the module."""
        with self._changed:
            _merge(self.desired, patch)
            self.desired_version += 1
            version = self.desired_version
        self._publish(f"$iothub/twin/PATCH/properties/desired/?$version={version}",
                      {**patch, "$version": version})
        return version

    def call_method(self, name: str, payload: Any = None,
                    timeout: float = 30) -> tuple[int, Any]:
        """Invoke a direct method; returns (status, payload) of the module's answer."""
        rid = uuid.uuid4().hex[:8]
        data = b"" if payload is None else json.dumps(payload).encode()
        self._client.publish(f"$iothub/methods/POST/{quote(name, safe='')}/?$rid={rid}",
                             data, qos=0)
        deadline = time.monotonic() + timeout
        with self._changed:
            while rid not in self._method_answers:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no answer to method {name} within {timeout} s")
                self._changed.wait(left)
            return self._method_answers.pop(rid)

    def wait_outputs(self, output: str, count: int, timeout: float = 30) -> list[OutputMessage]:
        """The first ``count`` messages sent to ``output``; raises TimeoutError if fewer."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [m for m in self.outputs if m.output == output]
                if len(found) >= count:
                    return found[:count]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(found)} of {count} messages on output {output} "
                                       f"within {timeout} s")
                self._changed.wait(left)

    def wait_reported(self, predicate: Any, timeout: float = 30) -> dict[str, Any]:
        """Wait until ``predicate(reported)`` is true; returns the reported properties."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self.reported):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"reported properties never matched: {self.reported}")
                self._changed.wait(left)
            copy: dict[str, Any] = json.loads(json.dumps(self.reported))
            return copy


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """JSON merge patch, as twins apply them: null removes a property."""
    for key, value in patch.items():
        if key == "$version":
            continue
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = json.loads(json.dumps(value))
