"""MQTT transport (paho-mqtt 1.6 API; azure-iot-device 2.14 pins paho < 2).

Two connections to the broker, each with a persistent session:

* **intake** subscribes to the input filters. paho 1.6 acknowledges a QoS 1
  message as soon as ``on_message`` returns; this client defers that PUBACK
  until the message's answer has been acknowledged by the broker, so a crash
  anywhere in between makes the broker redeliver the input instead of losing
  it. On shutdown it stops taking messages but stays connected until the
  answers in flight are acknowledged; what it did not take stays queued in the
  broker for the next start (it never unsubscribes).
* **output** publishes results, errors and the retained availability topic
  (``online``/``offline``, with ``offline`` as the last will).

Both reconnect with exponential back-off and the intake resubscribes after
every reconnect. Packet ids are only acknowledged within the session they
belong to: when the broker reports that the session was not resumed, pending
acknowledgements of the old session are dropped (the broker forgot them).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_module.config import MqttSettings, subscription_filter
from edge_module.envelope import error_envelope
from edge_module.errors import ErrorCode
from edge_module.logs import get_logger
from edge_module.metrics import Metrics
from edge_module.supervisor import Keep, run_here
from edge_module.transport.base import Deliver, Inbound
from edge_module.transport.paho_fix import apply as apply_paho_fix

apply_paho_fix()
log = get_logger("mqtt")


class ReportingClient(mqtt.Client):  # type: ignore[misc]
    """A paho 1.6 client that keeps why its last connection attempt failed.

    paho's network thread swallows the exception of a failed (re)connect and only
    calls ``on_connect_fail(client, userdata)``; this keeps the exception for it.
    """

    last_connect_error: BaseException | None = None

    def reconnect(self) -> int:
        try:
            result = int(mqtt.Client.reconnect(self))
        except OSError as exc:  # paho retries these with back-off
            self.last_connect_error = exc
            raise
        self.last_connect_error = None
        return result


class DeferredAckClient(ReportingClient):
    """A paho 1.6 client whose QoS 1 PUBACKs are sent by ``ack``, not by paho."""

    def _send_puback(self, mid: int) -> int:
        return int(mqtt.MQTT_ERR_SUCCESS)  # deferred: see MqttTransport._settle_input

    def ack(self, mid: int) -> int:
        return int(mqtt.Client._send_puback(self, mid))


def _reason(rc: Any) -> int:
    return int(getattr(rc, "value", rc))


class MqttTransport:
    def __init__(
        self,
        settings: MqttSettings,
        client_id: str,
        metrics: Metrics,
        receive_maximum: int = 256,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.v5 = settings.protocol == "5"
        self._filters = [subscription_filter(f) for f in settings.input_topic]
        self._deliver: Deliver | None = None
        self._accepting = True
        self._lock = threading.Lock()
        self._epoch = 0  # bumped whenever the broker did not resume our intake session
        self._taken: set[tuple[int, int]] = set()  # (epoch, mid) taken, not yet acknowledged
        self._pending: dict[int, Callable[[], None]] = {}  # output mid -> settle callback
        self._early: set[int] = set()  # output mids acknowledged before we registered them
        self._receive_maximum = max(1, min(receive_maximum, 65535))
        self._subscribed = False  # the broker acknowledged the intake's subscriptions
        self._intake = self._client(f"{client_id}-in", DeferredAckClient)
        self._output = self._client(f"{client_id}-out", ReportingClient)
        self._intake.on_connect = self._on_intake_connect
        self._intake.on_message = self._on_message
        self._intake.on_disconnect = self._on_disconnect("intake")
        self._intake.on_connect_fail = self._on_connect_fail("intake")
        self._intake.on_subscribe = self._on_subscribe
        self._output.on_connect = self._on_output_connect
        self._output.on_publish = self._on_publish
        self._output.on_disconnect = self._on_disconnect("output")
        self._output.on_connect_fail = self._on_connect_fail("output")
        self._output.will_set(settings.availability_topic, b"offline", qos=1, retain=True)
        self._output.max_inflight_messages_set(1000)
        # paho runs each connection's network loop on a thread of its own; an error
        # outside the callbacks (which suppress_exceptions covers) would end it for
        # good. The app sets ``keep`` to its supervisor's, which logs, marks the loop
        # down (/ready) and runs it again.
        self.keep: Keep = run_here
        for name, client in (("mqtt-intake", self._intake), ("mqtt-output", self._output)):
            client._thread_main = self._network_loop(name, client)

    def _network_loop(self, name: str, client: mqtt.Client) -> Callable[[], None]:
        def loop() -> None:  # what paho's loop_start runs, under ``keep``
            self.keep(name, lambda: client.loop_forever(retry_first_connection=True))
        return loop

    def _client(self, client_id: str, cls: type[ReportingClient]) -> ReportingClient:
        s = self.settings
        if self.v5:
            client = cls(client_id=client_id, protocol=mqtt.MQTTv5)
        else:
            client = cls(client_id=client_id, clean_session=False, protocol=mqtt.MQTTv311)
        if s.username is not None:
            password = s.password.get_secret_value() if s.password is not None else None
            client.username_pw_set(s.username, password)
        if s.tls.ca_file is not None:
            client.tls_set(
                ca_certs=str(s.tls.ca_file),
                certfile=str(s.tls.cert_file) if s.tls.cert_file else None,
                keyfile=str(s.tls.key_file) if s.tls.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
            client.tls_insecure_set(s.tls.insecure)
        client.reconnect_delay_set(min_delay=s.reconnect_min_delay,
                                   max_delay=s.reconnect_max_delay)
        client.suppress_exceptions = True  # a bug in a callback must not kill the loop
        return client

    # -- lifecycle --------------------------------------------------------

    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._connect(self._output, receive_maximum=None)
        self._connect(self._intake, receive_maximum=self._receive_maximum)
        log.info("mqtt_connecting", host=self.settings.host, port=self.settings.port,
                 protocol=self.settings.protocol, tls=self.settings.tls.ca_file is not None,
                 inputs=self.settings.input_topic)

    def _connect(self, client: mqtt.Client, receive_maximum: int | None) -> None:
        s = self.settings
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = s.session_expiry
            if receive_maximum is not None:
                props.ReceiveMaximum = receive_maximum
            client.connect_async(s.host, s.port, s.keepalive, clean_start=False,
                                 properties=props)
        else:
            client.connect_async(s.host, s.port, s.keepalive)
        client.loop_start()

    @property
    def connected(self) -> bool:
        """Both connections up and the input subscriptions acknowledged by the broker
        (an input published before the SUBACK would not reach us)."""
        return bool(self._intake.is_connected() and self._output.is_connected()
                    and self._subscribed)

    def stop_intake(self) -> None:
        """Take no more messages; those not taken stay with the broker."""
        self._accepting = False
        log.info("mqtt_intake_stopped")

    def close(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(cb is not _noop for cb in list(self._pending.values())) and \
                time.monotonic() < deadline:
            time.sleep(0.01)
        if self._pending:
            log.warning("mqtt_unacknowledged_at_shutdown", count=len(self._pending),
                        effect="their inputs stay unacknowledged and are redelivered")
        info = self._output.publish(self.settings.availability_topic, b"offline", qos=1,
                                    retain=True)
        self._track(info.mid, _noop)
        try:
            info.wait_for_publish(timeout=max(0.1, deadline - time.monotonic()))
        except (RuntimeError, ValueError) as exc:  # paho raises when not connected
            log.warning("mqtt_offline_not_announced", reason=str(exc),
                        effect="the broker publishes the last will 'offline' instead")
        for client in (self._intake, self._output):
            client.disconnect()
            client.loop_stop()
        log.info("mqtt_closed")

    # -- callbacks (paho's network threads) -------------------------------

    def _on_connect_fail(self, name: str) -> Callable[..., None]:
        """Each failed attempt, at each back-off step: where, why and what to do."""
        def handler(client: ReportingClient, _: Any) -> None:
            s = self.settings
            reason, fix = connect_failure(client.last_connect_error, s.host, s.port,
                                          tls=s.tls.ca_file is not None)
            log.warning("mqtt_unreachable", client=name, host=s.host, port=s.port,
                        reason=reason, detail=_describe(client.last_connect_error),
                        retry_in_seconds=_next_delay(client, s), fix=fix)
        return handler

    def _refused(self, name: str, rc: Any) -> None:
        s = self.settings
        auth = _reason(rc) in AUTH_REFUSALS
        log.error("mqtt_connect_refused", client=name, host=s.host, port=s.port,
                  reason="auth" if auth else "refused by broker", detail=str(rc),
                  retry="reconnecting with back-off",
                  fix="check Mqtt:Username, Mqtt:Password and the broker's ACL" if auth
                  else f"see the broker's log for why it refused {name}; check Mqtt:ClientId "
                  "and Mqtt:Protocol")

    def _on_output_connect(self, client: mqtt.Client, _: Any, flags: Any, rc: Any,
                           *__: Any) -> None:
        if _reason(rc) != 0:
            self._refused("output", rc)
            return
        _no_delay(client)
        info = client.publish(self.settings.availability_topic, b"online", qos=1, retain=True)
        self._track(info.mid, _noop)
        self._update_connected()
        log.info("mqtt_connected", client="output")

    def _on_intake_connect(self, client: mqtt.Client, _: Any, flags: Any, rc: Any,
                           *__: Any) -> None:
        if _reason(rc) != 0:
            self._refused("intake", rc)
            return
        resumed = bool(flags.get("session present", 0))
        if not resumed:
            with self._lock:
                self._epoch += 1
                self._taken.clear()
        qos = self.settings.qos
        _no_delay(client)
        self._subscribed = False
        client.subscribe([(topic_filter, qos) for topic_filter in self.settings.input_topic])
        self._update_connected()
        log.info("mqtt_connected", client="intake", session_resumed=resumed,
                 subscribed=self.settings.input_topic)

    def _on_subscribe(self, client: mqtt.Client, _: Any, mid: int, granted: Any,
                      *__: Any) -> None:
        codes = [int(getattr(g, "value", g)) for g in (granted or [])]
        refused = [f for f, code in zip(self.settings.input_topic, codes, strict=False)
                   if code >= 0x80]
        if refused:
            log.error("mqtt_subscribe_refused", host=self.settings.host,
                      port=self.settings.port, filters=refused,
                      fix="allow this client to subscribe to Mqtt:InputTopic in the "
                      "broker's ACL, or correct Mqtt:InputTopic")
        self._subscribed = len(refused) < len(self.settings.input_topic)
        self._update_connected()

    def _on_disconnect(self, name: str) -> Callable[..., None]:
        def handler(client: mqtt.Client, _: Any, rc: Any, *__: Any) -> None:
            self._update_connected()
            if _reason(rc) != 0:
                log.warning("mqtt_disconnected", client=name, reason=str(rc),
                            retry="reconnecting with back-off")
        return handler

    def _update_connected(self) -> None:
        self.metrics.connected.set(1 if self.connected else 0)

    def _on_message(self, client: mqtt.Client, _: Any, msg: mqtt.MQTTMessage) -> None:
        if not self._accepting or self._deliver is None:
            return  # not acknowledged: the broker redelivers it to the next session
        settle: Callable[[], None] = _noop
        if msg.qos > 0:
            with self._lock:
                key = (self._epoch, msg.mid)
                if msg.dup and key in self._taken:
                    return  # a redelivery of a message still being processed
                self._taken.add(key)
            settle = _bind_settle(self, key)
        reply_to = correlation = content_type = None
        props = getattr(msg, "properties", None)
        if props is not None:
            reply_to = getattr(props, "ResponseTopic", None)
            raw = getattr(props, "CorrelationData", None)
            if raw is not None:
                correlation = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else \
                    str(raw)
            content_type = getattr(props, "ContentType", None)
        inbound = Inbound(
            payload=msg.payload, source=msg.topic, correlation_id=correlation,
            reply_to=reply_to, content_type=content_type, settle=settle,
            delivery_key=str(msg.mid) if msg.qos > 0 else None, redelivered=bool(msg.dup),
            model=topic_level(msg.topic, self.settings.model_topic_level),
            version=topic_level(msg.topic, self.settings.version_topic_level),
        )
        problem = _unusable_topic(reply_to) if reply_to else None
        if problem is not None:  # answered on the error topic; nothing reaches the model
            request_id = correlation or uuid.uuid4().hex
            self.metrics.errors.labels(code=ErrorCode.INVALID_REQUEST).inc()
            self.send_error(inbound, error_envelope(
                request_id, ErrorCode.INVALID_REQUEST, f"the MQTT v5 response topic cannot "
                f"take an answer: {problem}; send a plain topic (no + or #)"))
            return
        derived = bool(reply_to) or "{topic}" in self.settings.result_topic  # else checked
        if derived and self._loops(self._result_topic(inbound)):  # at start (settings.py)
            # A result that could not be published must not be served: it would be billed
            # and never delivered. Refused here, unbilled; the error topic says so when it
            # does not loop as well (``_send`` only logs then).
            request_id = correlation or uuid.uuid4().hex
            self.metrics.errors.labels(code=ErrorCode.OUTPUT_TOPIC_LOOP).inc()
            log.error("mqtt_output_loop", topic=self._result_topic(inbound),
                      code=ErrorCode.OUTPUT_TOPIC_LOOP, effect="the input is not served "
                      "and not billed", fix="choose Mqtt:ResultTopic (or the response "
                      "topic) outside Mqtt:InputTopic")
            self.send_error(inbound, error_envelope(
                request_id, ErrorCode.OUTPUT_TOPIC_LOOP, "the result's topic would match "
                "the module's input filters, so no result could be sent; the input is not "
                "served"))
            return
        self._deliver(inbound)

    def _settle_input(self, key: tuple[int, int]) -> None:
        with self._lock:
            if key not in self._taken:
                return
            self._taken.discard(key)
            current = key[0] == self._epoch
        if current:
            self._intake.ack(key[1])

    def _on_publish(self, client: mqtt.Client, _: Any, mid: int) -> None:
        with self._lock:
            settle = self._pending.pop(mid, None)
            if settle is None:
                self._early.add(mid)
                return
        settle()

    # -- sending ----------------------------------------------------------

    def send_result(self, inbound: Inbound, body: bytes) -> None:
        self._send(inbound, body, self._result_topic(inbound))

    def _result_topic(self, inbound: Inbound) -> str:
        if inbound.reply_to:  # the client's own topic: used as it is, never as a template
            return inbound.reply_to
        return self.settings.result_topic.replace("{topic}", inbound.source)

    def _loops(self, topic: str) -> bool:
        """Whether a message published on ``topic`` would come back as an input."""
        return any(mqtt.topic_matches_sub(f, topic) for f in self._filters)

    def send_error(self, inbound: Inbound, body: bytes) -> None:
        self._send(inbound, body, self.settings.error_topic.replace("{topic}", inbound.source))

    def _send(self, inbound: Inbound, body: bytes, topic: str) -> None:
        if self._loops(topic):
            self.metrics.publish_failures.inc()
            log.error("mqtt_output_loop", topic=topic, code=ErrorCode.OUTPUT_TOPIC_LOOP,
                      fix="choose ResultTopic/ErrorTopic (or the response topic) outside "
                          "Mqtt:InputTopic")
            inbound.settle()
            return
        props = None
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = "application/json"
            if inbound.correlation_id is not None:
                props.CorrelationData = inbound.correlation_id.encode()
        info = self._output.publish(topic, body, qos=self.settings.qos, properties=props)
        if self.settings.qos == 0 and info.rc != mqtt.MQTT_ERR_SUCCESS:
            self.metrics.publish_failures.inc()
            log.warning("mqtt_publish_failed", topic=topic, reason=mqtt.error_string(info.rc),
                        effect="QoS 0 answer not sent; use Mqtt:Qos=1 for guaranteed delivery")
            inbound.settle()
            return
        self._track(info.mid, inbound.settle)

    def _track(self, mid: int, settle: Callable[[], None]) -> None:
        """Call ``settle`` once the broker acknowledges publish ``mid`` (maybe already)."""
        with self._lock:
            if mid in self._early:
                self._early.discard(mid)
                acknowledged = True
            else:
                self._pending[mid] = settle
                acknowledged = False
        if acknowledged:
            settle()


# CONNACK codes that mean "who you are is not accepted": MQTT 3.1.1 (4, 5), v5 (134, 135, 140).
AUTH_REFUSALS = {4, 5, 134, 135, 140}


def connect_failure(exc: BaseException | None, host: str, port: int,
                    tls: bool) -> tuple[str, str]:
    """(reason, fix) for a connection attempt that failed before the broker answered."""
    where = f"{host}:{port}"
    if isinstance(exc, socket.gaierror):
        return "dns", (f"the host name {host!r} does not resolve: check Mqtt:Host and this "
                       "device's DNS")
    if isinstance(exc, ConnectionRefusedError):
        return "refused", (f"nothing listens on {where}: check Mqtt:Host and Mqtt:Port and "
                           "that the broker runs")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "tls", (f"the certificate of {where} is not trusted: Mqtt:Tls:CaFile must be "
                       "the CA that signed it and Mqtt:Host a name in it")
    if isinstance(exc, ssl.SSLError):
        return "tls", (f"the TLS handshake with {where} failed: check that Mqtt:Port is the "
                       "broker's TLS listener and the Mqtt:Tls files")
    if isinstance(exc, TimeoutError):
        return "timeout", (f"{where} did not answer: check the network path and firewalls "
                           "between this device and the broker")
    if tls and isinstance(exc, ConnectionResetError):
        return "tls", (f"{where} closed the connection during the TLS handshake: check that "
                       "Mqtt:Port is the broker's TLS listener")
    return "network", (f"cannot connect to {where}: check Mqtt:Host, Mqtt:Port and the "
                       "network path")


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "connection failed"
    return f"{type(exc).__name__}: {exc}"


def _next_delay(client: mqtt.Client, s: MqttSettings) -> float:
    """The wait paho is about to take (its back-off doubles from min to max)."""
    current = getattr(client, "_reconnect_delay", None)
    delay = s.reconnect_min_delay if current is None else min(current * 2,
                                                               s.reconnect_max_delay)
    return round(float(delay), 2)


def _no_delay(client: mqtt.Client) -> None:
    """Turn Nagle's algorithm off: paho 1.6 leaves it on, which adds ~40 ms per answer."""
    sock = client.socket()
    if sock is not None and hasattr(sock, "setsockopt"):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _noop() -> None:
    return None


def _bind_settle(transport: MqttTransport, key: tuple[int, int]) -> Callable[[], None]:
    return lambda: transport._settle_input(key)


def _unusable_topic(topic: str) -> str | None:
    """Why the module cannot publish to ``topic`` (a client's response topic), if so."""
    if "+" in topic or "#" in topic:
        return "it holds a wildcard"
    if "\x00" in topic:
        return "it holds a NUL character"
    if len(topic.encode("utf-8", "surrogatepass")) > 65535:
        return "it is longer than MQTT allows"
    return None
def topic_level(topic: str, level: int | None) -> str | None:
    """The topic's level ``level`` (0 = the first), None when unset, missing or empty:
    how ``Mqtt:ModelTopicLevel``/``VersionTopicLevel`` name a model and version."""
    if level is None:
        return None
    levels = topic.split("/")
    return levels[level] or None if level < len(levels) else None
