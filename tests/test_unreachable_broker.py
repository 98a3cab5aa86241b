"""A broker that cannot be reached is logged at each back-off step: where, why, what to do."""

from __future__ import annotations

import io
import json
import socket
import ssl
from pathlib import Path

from edge_module.transport.mqtt import connect_failure
from simulator.billing import BillingSimulator
from simulator.certs import make_server_cert
from tests.support import Broker, Module, free_port, wait_until


def _unreachable_lines(module: Module) -> list[dict[str, object]]:
    out = []
    for line in module.log_text().splitlines():
        if '"mqtt_unreachable"' in line:
            out.append(json.loads(line))
    return out


def test_refused_and_tls_failures_are_logged_with_host_port_reason_and_fix(
    tmp_path: Path, broker: Broker, billing: BillingSimulator
) -> None:
    certs = make_server_cert(tmp_path / "tls", ["127.0.0.1"])
    closed_port = free_port()  # nothing listens here
    refused = Module(tmp_path / "refused", closed_port, billing=billing.url,
                     public_key=billing.public_key_b64)
    # TLS towards the plain listener: the handshake fails.
    tls = Module(tmp_path / "tls-module", broker.port, f"Mqtt:Tls:CaFile={certs.ca}",
                 billing=billing.url, public_key=billing.public_key_b64)
    for module in (refused, tls):
        module.workdir.mkdir(parents=True, exist_ok=True)
        module.start(wait_ready=False)
    try:
        wait_until(lambda: len([r for r in _unreachable_lines(refused)
                                if r["client"] == "intake"]) >= 3, 30,
                   f"three refused attempts logged; log:\n{refused.log_tail()}")
        lines = [r for r in _unreachable_lines(refused) if r["client"] == "intake"]
        first = lines[0]
        assert first["host"] == "127.0.0.1" and first["port"] == closed_port
        assert first["reason"] == "refused" and first["level"] == "warning"
        assert "Mqtt:Port" in str(first["fix"]) and "ConnectionRefusedError" in str(
            first["detail"])
        delays = [float(str(r["retry_in_seconds"])) for r in lines]
        assert delays[0] == 0.5 and max(delays) <= 1.0  # Module sets ReconnectMaxDelay=1
        assert refused.http("/ready")[0] == 503

        wait_until(lambda: any(r["reason"] == "tls" for r in _unreachable_lines(tls)), 30,
                   f"a TLS failure logged; log:\n{tls.log_tail()}")
        line = next(r for r in _unreachable_lines(tls) if r["reason"] == "tls")
        assert line["port"] == broker.port and "TLS listener" in str(line["fix"])
    finally:
        refused.stop()
        tls.stop()


def test_each_cause_gets_its_own_reason_and_fix() -> None:
    cases: list[tuple[BaseException | None, str, str]] = [
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "dns", "Mqtt:Host"),
        (ConnectionRefusedError(111, "Connection refused"), "refused", "Mqtt:Port"),
        (ssl.SSLCertVerificationError("certificate verify failed"), "tls", "Mqtt:Tls:CaFile"),
        (ssl.SSLError("wrong version number"), "tls", "TLS listener"),
        (TimeoutError("timed out"), "timeout", "firewalls"),
        (OSError(101, "Network is unreachable"), "network", "network path"),
        (None, "network", "network path"),
    ]
    for exc, reason, hint in cases:
        got, fix = connect_failure(exc, "broker.local", 8883, tls=True)
        assert got == reason, exc
        assert (hint in fix and "8883" in fix) or (reason == "dns" and "'broker.local'" in fix)



def test_a_subscription_the_broker_refuses_is_logged_and_keeps_the_transport_unready(
) -> None:
    """mosquitto 2.0 grants every well-formed filter (its ACL is applied per message), so
    the SUBACK a stricter broker sends is fed to the transport's handler directly."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCodes

    from edge_module import logs
    from edge_module.config import MqttSettings
    from edge_module.metrics import Metrics
    from edge_module.transport.mqtt import MqttTransport

    stream = io.StringIO()
    logs.configure("info", "json", stream)
    settings = MqttSettings(InputTopic=["em/in/#", "em/other/#"])
    transport = MqttTransport(settings, "subscribe-test", Metrics())
    granted = ReasonCodes(PacketTypes.SUBACK, identifier=0)
    refused = ReasonCodes(PacketTypes.SUBACK, identifier=0x87)  # not authorised
    transport._on_subscribe(None, None, 1, [refused, refused], None)
    assert transport._subscribed is False
    line = json.loads(stream.getvalue().splitlines()[-1])
    assert line["event"] == "mqtt_subscribe_refused" and line["level"] == "error"
    assert line["filters"] == ["em/in/#", "em/other/#"] and "ACL" in line["fix"]
    transport._on_subscribe(None, None, 2, [granted, refused], None)
    assert transport._subscribed is True  # one filter serves; the other is logged
    assert json.loads(stream.getvalue().splitlines()[-1])["filters"] == ["em/other/#"]
    transport._on_subscribe(None, None, 3, [1, 1])  # MQTT 3.1.1: granted QoS values
    assert transport._subscribed is True
