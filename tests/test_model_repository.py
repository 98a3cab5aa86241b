"""A model repository end to end over a real mosquitto: the module as a process serving
the built-in digits and telemetry models (copied into a temporary repository, digits
in two versions), routed by topic level and by payload field; every error code an MQTT
input can reach answered and never billed; a version swapped in under steady load with
nothing lost or failed; a broken model added while the others serve.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from simulator.billing import BillingSimulator
from simulator.datasets import digits_split
from tests.fast.test_repository import TELEMETRY_ROW, add_version
from tests.support import Collector, Module, digit_png, wait_until

RESULTS, ERRORS = "em/results", "em/errors"
FAST_DRAIN = ("Metering:MaxDelaySeconds=0.2", "Metering:MaxBackoffSeconds=1",
              "Metering:TimeoutSeconds=2")


def billed(billing: BillingSimulator) -> int:
    return int(billing.totals()["records"])


def _repository(tmp_path: Path) -> Path:
    root = tmp_path / "repository"
    add_version(root, "digits", 1)
    add_version(root, "digits", 2)
    (root / "digits" / "config.json").write_text(json.dumps({"versionPolicy": {"all": {}}}))
    add_version(root, "telemetry", 1)
    return root


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_two_models_routed_by_topic_and_field_and_only_answers_billed(
    tmp_path: Path, start_module: Callable[..., Module], collector: Collector,
    billing: BillingSimulator,
) -> None:
    root = _repository(tmp_path)
    module = start_module(f"Model:Repository={root}", "Model:Default=digits",
                          "Mqtt:ModelTopicLevel=2", "Mqtt:VersionTopicLevel=3",
                          "Pipeline:MaxPayloadBytes=8192", "Pipeline:MaxImagePixels=2000",
                          "Pipeline:MaxTensorElements=1000", *FAST_DRAIN)
    _, x, _, y = digits_split()
    good = digit_png(x[0])
    b64 = base64.b64encode(good).decode()
    answered = [  # (topic, payload, model, version)
        ("em/in/digits", good, "digits", "2"),  # the newest version
        ("em/in/digits/1", good, "digits", "1"),
        ("em/in/digits/2", good, "digits", "2"),
        ("em/in", good, "digits", "2"),  # no level: the default model
        ("em/in/telemetry", json.dumps({"tensor": TELEMETRY_ROW}).encode(), "telemetry", "1"),
        ("em/in/any", json.dumps({"id": "f1", "model": "telemetry",
                                  "tensor": TELEMETRY_ROW}).encode(), "telemetry", "1"),
        ("em/in/telemetry", json.dumps({"id": "f2", "model": "digits", "version": "1",
                                        "image": b64}).encode(), "digits", "1"),
    ]
    big_image = cv2.imencode(".png", np.zeros((64, 64), np.uint8))[1].tobytes()
    nan_row = "[" + ",".join(["NaN"] * 8) + "]"
    refused = [  # (topic, payload, code): every code a message over MQTT can reach
        ("em/in/digits", b"", "EmptyPayload"),
        ("em/in/digits", b"{" + b" " * 9000 + b"}", "PayloadTooLarge"),
        ("em/in/digits", b"plain text", "UnsupportedPayload"),
        ("em/in/digits", b"{not json", "InvalidJson"),
        ("em/in/digits", b'{"id": "u", "image": "", "colour": 1}', "UnknownField"),
        ("em/in/digits", b'{"id": "m"}', "InvalidRequest"),
        ("em/in/digits", b'{"id": "b", "image": "%%%"}', "InvalidBase64"),
        ("em/in/digits", b"\xff\xd8\xff\xe0" + b"\x00" * 64, "ImageDecodeFailed"),
        ("em/in/digits", big_image, "ImageTooLarge"),
        ("em/in/telemetry", good, "InputKindMismatch"),
        ("em/in/telemetry", b'{"id": "s", "tensor": [1, 2, 3]}', "TensorShapeMismatch"),
        ("em/in/telemetry", b'{"id": "t", "tensor": [["a"]]}', "TensorDtypeInvalid"),
        ("em/in/telemetry", b'{"id": "v", "tensor": ' + nan_row.encode() + b"}",
         "TensorValueInvalid"),
        ("em/in/telemetry", _npy(np.zeros((200, 8), np.float32)), "TensorTooLarge"),
        ("em/in/telemetry", b'{"id": "big", "items": ['
         + b",".join([b'{"tensor": 0}'] * 65) + b"]}", "BatchTooLarge"),
        ("em/in/nope", good, "UnknownModel"),
        ("em/in/digits/7", good, "UnknownModel"),
        ("em/in/any", b'{"id": "n", "model": "nope", "tensor": [1]}', "UnknownModel"),
    ]
    for topic, payload, *_ in answered + refused:
        collector.publish(topic, payload)
    results = collector.wait(RESULTS, len(answered))
    errors = collector.wait(ERRORS, len(refused))
    time.sleep(0.3)  # nothing more arrives
    assert len(collector.on(RESULTS)) == len(answered)
    assert sorted(e["error"]["code"] for e in collector.json(ERRORS)) == \
        sorted(code for *_, code in refused)
    assert sorted((r["model"]["name"], r["model"]["version"]) for r in results) == \
        sorted((m, v) for *_, m, v in answered)
    assert all(len(r["model"]["sha256"]) == 64 for r in results)
    digits_labels = [r["results"][0]["label"] for r in results if r["model"]["name"] == "digits"]
    assert digits_labels == [str(y[0])] * len(digits_labels)
    assert {e["id"] for e in errors if e["error"]["code"] == "UnknownModel"} >= {"n"}
    # billed == answers: every result has its record, no error envelope has one
    wait_until(lambda: billed(billing) == len(answered), 20, f"{len(answered)} billed")
    time.sleep(0.5)
    assert billed(billing) == len(answered)
    models = {(m["name"], m["version"]): m for m in module.status()["models"]}
    assert {k: m["state"] for k, m in models.items()} == {
        ("digits", "1"): "ready", ("digits", "2"): "ready", ("telemetry", "1"): "ready"}
    assert module.metric("edge_module_model_state",
                         'model="telemetry",state="ready",version="1"') == 1


def test_a_version_swap_under_steady_load_loses_nothing_and_a_broken_model_harms_none(
    tmp_path: Path, start_module: Callable[..., Module], collector: Collector,
    billing: BillingSimulator,
) -> None:
    root = tmp_path / "repository"
    add_version(root, "digits", 1)
    add_version(root, "telemetry", 1)
    module = start_module(f"Model:Repository={root}", "Model:Default=digits",
                          "Model:RepositoryPollSeconds=0.1", *FAST_DRAIN)
    _, x, _, _ = digits_split()
    total, swapped_at = 200, 70
    deadline = time.monotonic() + 30
    for i in range(total):
        collector.publish("em/in/cam", json.dumps(
            {"id": f"s{i}", "image": base64.b64encode(digit_png(x[i % len(x)])).decode()}
        ).encode())
        if i == swapped_at:
            add_version(root, "digits", 2)  # picked up by the poll while inputs flow
            broken = root / "broken" / "1"
            broken.mkdir(parents=True)
            (broken / "model.onnx").write_bytes(b"not a graph")
            (broken / "model.json").write_text("{}")
        time.sleep(0.005)  # a steady stream across the swap
        assert time.monotonic() < deadline
    results = collector.wait(RESULTS, total, timeout=30)
    assert collector.on(ERRORS) == []
    assert sorted(r["id"] for r in results) == sorted(f"s{i}" for i in range(total))
    versions = [r["model"]["version"] for r in sorted(results, key=lambda r: int(r["id"][1:]))]
    assert versions[0] == "1" and versions[-1] == "2"
    assert set(versions) == {"1", "2"}
    wait_until(lambda: billed(billing) == total, 20, f"{total} billed")
    states = {(m["name"], m["version"]): m for m in module.status()["models"]}
    assert states[("broken", "1")]["state"] == "failed" and states[("broken", "1")]["reason"]
    assert states[("digits", "2")]["state"] == "ready" and ("digits", "1") not in states
    assert module.ready()
