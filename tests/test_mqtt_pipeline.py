"""End to end over a real mosquitto: the module as a process, a separate paho client."""

from __future__ import annotations

import base64
import io
import json
import signal
import time
from collections.abc import Callable

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from simulator.datasets import digits_split
from tests.support import Broker, Collector, Module, digit_png, wait_until

RESULTS, ERRORS, STATUS = "em/results", "em/errors", "em/status"


def held_out(n: int) -> tuple[np.ndarray, np.ndarray]:
    _, x_test, _, y_test = digits_split()
    return x_test[:n], y_test[:n]


def test_digit_images_come_back_with_the_right_labels(
    start_module: Callable[..., Module], collector: Collector
) -> None:
    module = start_module()
    x, y = held_out(200)
    for i, pixels in enumerate(x):
        fmt = ".jpg" if i % 2 else ".png"
        body = json.dumps({"id": f"d{i}",
                           "image": base64.b64encode(digit_png(pixels, fmt)).decode()})
        collector.publish("em/in/cam1", body.encode())
    results = {r["id"]: r for r in collector.wait(RESULTS, len(x))}
    correct = sum(results[f"d{i}"]["results"][0]["label"] == str(label)
                  for i, label in enumerate(y))
    assert correct / len(y) >= 0.95, f"accuracy {correct / len(y):.3f}"
    sample = results["d0"]
    assert sample["model"]["name"] == "digits"
    assert len(sample["model"]["sha256"]) == 64
    assert len(sample["results"][0]["topK"]) == 3
    assert set(sample["timingMs"]) == {"decode", "infer", "total"}
    assert collector.on(ERRORS) == []
    assert module.metric("edge_module_results_published_total") == len(x)


def test_raw_image_bytes_and_npy_and_batches(
    start_module: Callable[..., Module], collector: Collector
) -> None:
    start_module()
    x, y = held_out(4)
    collector.publish("em/in/raw", digit_png(x[0]))
    buffer = io.BytesIO()
    np.save(buffer, x[1].reshape(1, 8, 8).astype(np.float32))
    collector.publish("em/in/npy", buffer.getvalue())
    items = [{"image": base64.b64encode(digit_png(p)).decode()} for p in x[2:4]]
    collector.publish("em/in/batch", json.dumps({"id": "b1", "items": items}).encode())
    results = collector.wait(RESULTS, 3)
    by_count = sorted(results, key=lambda r: len(r["results"]))
    assert by_count[0]["results"][0]["label"] in {str(y[0]), str(y[1])}
    batch = next(r for r in results if r["id"] == "b1")
    assert [r["label"] for r in batch["results"]] == [str(y[2]), str(y[3])]


def test_telemetry_model_classifies_vectors(
    start_module: Callable[..., Module], collector: Collector
) -> None:
    start_module("Model:Name=telemetry")
    # A normal pump and one with a hot bearing and high current.
    normal = [55.5, 2.1, 49.2, 1.8, 7.2, 120.0, 41.5, 2950.0]
    hot = [85.0, 2.3, 49.0, 1.8, 7.1, 118.0, 54.0, 2950.0]
    collector.publish("em/in/pump", json.dumps({"id": "p1", "tensor": [normal, hot]}).encode())
    (result,) = collector.wait(RESULTS, 1)
    assert [r["label"] for r in result["results"]] == ["normal", "overheating"]


MALFORMED: list[tuple[bytes, str]] = [
    (b"", "EmptyPayload"),
    (b"{not json", "InvalidJson"),
    (b"plain text", "UnsupportedPayload"),
    (b'{"id": "u", "image": "", "colour": 1}', "UnknownField"),
    (b'{"id": "m"}', "InvalidRequest"),
    (b'{"id": "b", "image": "%%%"}', "InvalidBase64"),
    (b'{"id": "s", "tensor": [1, 2, 3]}', "TensorShapeMismatch"),
    (b'{"id": "t", "tensor": [["a"]]}', "TensorDtypeInvalid"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 64, "ImageDecodeFailed"),
    (b'{"id": "big", "items": [' + b",".join([b'{"tensor": 0}'] * 65) + b"]}",
     "BatchTooLarge"),
    (b"{" + b" " * 5000 + b"}", "PayloadTooLarge"),
]


def test_every_malformed_message_gets_its_error_and_good_ones_still_pass(
    start_module: Callable[..., Module], collector: Collector
) -> None:
    module = start_module("Pipeline:MaxPayloadBytes=4096")
    x, y = held_out(1)
    good = digit_png(x[0])
    truncated_jpeg = digit_png(x[0], ".jpg")[:-40]
    cases = [*MALFORMED, (truncated_jpeg, "ImageDecodeFailed")]
    for payload, _ in cases:
        collector.publish("em/in/bad", payload)
        collector.publish("em/in/good", good)
    errors = collector.wait(ERRORS, len(cases))
    results = collector.wait(RESULTS, len(cases))
    assert sorted(e["error"]["code"] for e in errors) == sorted(code for _, code in cases)
    assert all(e["error"]["message"] and e["id"] for e in errors)
    assert all(r["results"][0]["label"] == str(y[0]) for r in results)
    by_id = {e["id"]: e["error"]["code"] for e in errors}
    assert by_id["u"] == "UnknownField" and by_id["s"] == "TensorShapeMismatch"
    assert module.metric("edge_module_errors_total", 'code="EmptyPayload"') == 1
    assert module.ready()


def test_v5_response_topic_and_correlation_data_are_honoured(
    start_module: Callable[..., Module], collector: Collector, broker: Broker
) -> None:
    start_module()
    replies = Collector(broker.port, ["app/replies/1"])
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "app/replies/1"
    props.CorrelationData = b"corr-42"
    x, _ = held_out(1)
    collector.publish("em/in/cam", digit_png(x[0]), properties=props)
    (reply,) = replies.wait("app/replies/1", 1)
    assert reply["id"] == "corr-42"
    assert replies.on("app/replies/1")[0].properties.CorrelationData == b"corr-42"
    replies.close()


def test_a_response_topic_is_never_a_template_and_a_wildcard_one_is_refused(
    start_module: Callable[..., Module], collector: Collector, broker: Broker
) -> None:
    """A client's response topic is published to as it is: "{topic}" in it is not expanded
    (a client could grow it past MQTT's limit), and one the module cannot publish to gets
    InvalidRequest on the error topic, unbilled, instead of a crashed publish."""
    module = start_module()
    literal = "app/{topic}/replies"
    replies = Collector(broker.port, ["app/#"])
    x, _ = held_out(2)
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = literal
    props.CorrelationData = b"corr-literal"
    collector.publish("em/in/cam", digit_png(x[0]), properties=props)
    (reply,) = replies.wait(literal, 1)
    assert reply["id"] == "corr-literal"
    assert [m.topic for m in replies.messages] == [literal]  # not app/em/in/cam/replies
    bad = Properties(PacketTypes.PUBLISH)
    bad.ResponseTopic = "app/+/replies"
    bad.CorrelationData = b"corr-wild"
    collector.publish("em/in/cam", digit_png(x[1]), properties=bad)
    (error,) = collector.wait(ERRORS, 1)
    assert error["id"] == "corr-wild" and error["error"]["code"] == "InvalidRequest"
    wait_until(lambda: module.metric("edge_module_results_published_total") == 1, 5,
               "one result")
    assert len(replies.on(literal)) == 1
    replies.close()


def test_result_topic_derived_from_input_topic(
    start_module: Callable[..., Module], broker: Broker
) -> None:
    start_module("Mqtt:ResultTopic=answers/{topic}")
    answers = Collector(broker.port, ["answers/#"])
    x, _ = held_out(1)
    answers.publish("em/in/line3/cam7", digit_png(x[0]))
    assert len(answers.wait("answers/em/in/line3/cam7", 1)) == 1
    answers.close()


def test_mqtt_311_and_qos0(
    start_module: Callable[..., Module], collector: Collector
) -> None:
    start_module("Mqtt:Protocol=3.1.1", "Mqtt:Qos=0")
    x, y = held_out(5)
    for pixels in x:
        collector.publish("em/in/cam", digit_png(pixels), qos=0)
    results = collector.wait(RESULTS, 5)
    assert sorted(r["results"][0]["label"] for r in results) == sorted(str(v) for v in y)


def test_availability_is_retained_online_then_offline_on_sigterm(
    start_module: Callable[..., Module], collector: Collector, broker: Broker
) -> None:
    module = start_module()
    wait_until(lambda: bool(collector.on(STATUS)) and collector.on(STATUS)[-1].payload ==
               b"online", 10, "online")
    late = Collector(broker.port, [STATUS])  # retained: a late subscriber sees it too
    wait_until(lambda: [m.payload for m in late.on(STATUS)] == [b"online"], 10,
               "retained online")
    late.close()
    x, _ = held_out(30)
    for i, pixels in enumerate(x):
        body = {"id": f"s{i}", "tensor": pixels.reshape(1, 8, 8).tolist()}
        collector.publish("em/in/cam", json.dumps(body).encode())
    module.signal(signal.SIGTERM)
    assert module.wait_exit() == 0
    assert collector.on(STATUS)[-1].payload == b"offline"
    assert '"module_stopped"' in module.log_text()
    # What it had taken in was answered before exiting; what it had not taken stayed with
    # the broker and is answered after the next start: nothing is lost.
    assert '"shutdown_work_left"' not in module.log_text()
    start_module()
    wait_until(lambda: {r["id"] for r in collector.json(RESULTS)} >= {f"s{i}" for i in
                                                                       range(30)}, 20,
               "all 30 answered across the restart")


def test_input_published_while_the_module_is_down_is_processed_at_next_start(
    start_module: Callable[..., Module], collector: Collector
) -> None:
    module = start_module()
    module.stop()
    x, _ = held_out(10)
    for pixels in x:
        collector.publish("em/in/cam", digit_png(pixels))
    start_module()  # same Data:Path, so the same client id and broker session
    assert len(collector.wait(RESULTS, len(x))) == len(x)


def test_broker_restart_mid_stream_module_reconnects_and_continues(
    start_module: Callable[..., Module], broker: Broker, tmp_path: object
) -> None:
    module = start_module()
    x, _ = held_out(40)
    first = Collector(broker.port, [RESULTS])
    for pixels in x[:20]:
        first.publish("em/in/cam", digit_png(pixels))
    first.wait(RESULTS, 20)
    first.close()
    broker.kill()
    wait_until(lambda: module.http("/ready")[0] == 503, 10, "module not ready while down")
    broker.start()
    module.wait_ready(timeout=20)
    second = Collector(broker.port, [RESULTS])
    for pixels in x[20:]:
        second.publish("em/in/cam", digit_png(pixels))
    assert len(second.wait(RESULTS, 20)) >= 20
    assert module.process is not None and module.process.poll() is None
    assert '"mqtt_disconnected"' in module.log_text()
    second.close()


def test_health_ready_and_metrics_endpoints(start_module: Callable[..., Module]) -> None:
    module = start_module()
    assert module.http("/health")[0] == 200
    assert module.http("/ContainerLiveness")[0] == 200
    status, body = module.http("/ready")
    assert status == 200 and json.loads(body)["ready"] is True
    status, body = module.http("/metrics")
    text = body.decode()
    for name in ("edge_module_messages_received_total", "edge_module_errors_total",
                 "edge_module_inference_seconds_bucket", "edge_module_end_to_end_seconds_bucket",
                 "edge_module_intake_queue_depth"):
        assert name in text


def test_module_without_broker_is_alive_but_not_ready(tmp_path: object) -> None:
    from pathlib import Path

    from tests.support import free_port

    module = Module(Path(str(tmp_path)), free_port()).start(wait_ready=False)
    try:
        wait_until(lambda: module.http("/health")[0] == 200, 30, "health")
        time.sleep(0.5)
        assert module.http("/ready")[0] == 503
        assert b"broker" in module.http("/ready")[1]
    finally:
        module.stop()
    assert module.process is not None and module.process.returncode == 0


_ = mqtt  # the paho API is what the apps use; imported for type context


def test_tls_broker_with_username_and_password(
    tmp_path: object, billing: object
) -> None:
    import ssl
    from pathlib import Path

    from simulator.billing import BillingSimulator
    from simulator.broker import Broker
    from simulator.certs import make_server_cert

    assert isinstance(billing, BillingSimulator)
    work = Path(str(tmp_path))
    certs = make_server_cert(work / "tls", ["127.0.0.1"])
    tls_broker = Broker(work / "tls-broker", tls=(certs.cert, certs.key),
                        users={"edge": "broker-pw-1", "app": "app-pw-2"}).start()
    app = mqtt.Client(client_id="tls-app", protocol=mqtt.MQTTv5)
    app.tls_set(ca_certs=str(certs.ca), cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT)
    app.username_pw_set("app", "app-pw-2")
    got: list[mqtt.MQTTMessage] = []
    app.on_message = lambda c, u, m: got.append(m)
    app.connect("127.0.0.1", tls_broker.port)
    app.subscribe(RESULTS, qos=1)
    app.loop_start()
    settings = (f"Mqtt:Tls:CaFile={certs.ca}", "Mqtt:Username=edge",
                "Mqtt:Password=broker-pw-1")
    module = Module(work, tls_broker.port, *settings, billing=billing.url,
                    public_key=billing.public_key_b64).start()
    wrong = Module(work, tls_broker.port, f"Mqtt:Tls:CaFile={certs.ca}", "Mqtt:Username=edge",
                   "Mqtt:Password=not-it", billing=billing.url,
                   public_key=billing.public_key_b64, prefix="w")
    try:
        x, y = held_out(3)
        for pixels in x:
            app.publish("em/in/tls", digit_png(pixels), qos=1).wait_for_publish(5)
        wait_until(lambda: len(got) == 3, 15, "answers over TLS")
        labels = sorted(json.loads(m.payload)["results"][0]["label"] for m in got)
        assert labels == sorted(str(v) for v in y)
        wrong.start(wait_ready=False)
        wait_until(lambda: '"mqtt_connect_refused"' in wrong.log_text(), 20,
                   "a refused connection logged")
        assert wrong.http("/ready")[0] == 503
        assert "not-it" not in wrong.log_text() and "broker-pw-1" not in module.log_text()
    finally:
        wrong.stop()
        module.stop()
        app.loop_stop()
        tls_broker.stop()


def test_several_input_filters_with_wildcards(
    start_module: Callable[..., Module], collector: Collector
) -> None:
    start_module("Mqtt:InputTopic=em/in/#,plant/+/camera")
    x, y = held_out(3)
    collector.publish("em/in/a/b", digit_png(x[0]))
    collector.publish("plant/line7/camera", digit_png(x[1]))
    collector.publish("plant/line7/other", digit_png(x[2]))  # matches neither filter
    results = collector.wait(RESULTS, 2)
    time.sleep(0.5)
    assert len(collector.on(RESULTS)) == 2
    assert sorted(r["results"][0]["label"] for r in results) == sorted([str(y[0]), str(y[1])])
