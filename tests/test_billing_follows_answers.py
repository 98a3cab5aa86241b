"""Billing follows answers, for every error code: the module as a process, a real mosquitto,
real HTTP, the billing simulator and the ledger file itself.

Each scenario drives the module into error codes and counts, in ``Data:Path/ledger.db``
(the single source of billing truth), the records it wrote: exactly one per result
envelope delivered, none for any error envelope. ``test_every_error_code_has_a_scenario``
walks ``ErrorCode`` and fails for a code that no scenario here reaches and that is not
listed, with the reason, in ``ELSEWHERE`` (a test elsewhere that checks it unbilled).

Four module processes, each shared by the scenarios that fit it:

* a model repository (the digits and telemetry models, ``fragile``: a graph onnxruntime
  fails on for some values, ``slow``: a graph that takes a while per run) with an HTTP API
  key: every input error over MQTT, ``InferenceFailed``, ``OutputTopicLoop``, the HTTP
  refusals, and named copies arriving while the first is in flight (billed once);
* a ledger on a 3 MB tmpfs with ``Metering:MaxPendingRecords=5`` and an endpoint that
  answers busy: ``MeteringUnavailable`` (disk full), then ``MeteringBufferFull``;
* a gated licence: ``Unlicensed`` over MQTT and HTTP, ``RepositoryUnsupported``;
* the slow model behind a one-slot intake: ``Overloaded`` under a burst, then
  ``ShuttingDown`` for requests that arrive while a SIGTERM drains the ones in flight.
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import io
import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_module.errors import ErrorCode
from simulator.billing import BillingSimulator, KeyInfo
from simulator.datasets import digits_split
from tests.diskfull import Ballast, mounted_tmpfs
from tests.fast.test_repository import TELEMETRY_ROW, add_version
from tests.models import fragile_model, slow_model
from tests.support import (
    API_KEY,
    Broker,
    Collector,
    Module,
    digit_png,
    ledger_records,
    start_broker,
    wait_until,
)

RESULTS, ERRORS = "em/results", "em/errors"
FAST_DRAIN = ("Metering:MaxDelaySeconds=0.2", "Metering:MaxBackoffSeconds=1",
              "Metering:TimeoutSeconds=2")
HTTP_KEY = "http-key-0123456789abcdef"
E = ErrorCode

# -- the scenarios' codes (each test below asserts that its inputs get exactly these) ----

_BIG_IMAGE = cv2.imencode(".png", np.zeros((64, 64), np.uint8))[1].tobytes()
_NAN_ROW = ("[" + ",".join(["NaN"] * 8) + "]").encode()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _good_png() -> bytes:
    return digit_png(digits_split()[1][0])


MQTT_REFUSED: list[tuple[str, bytes, ErrorCode]] = [  # (topic, payload, code)
    ("em/in/digits", b"", E.EMPTY_PAYLOAD),
    ("em/in/digits", b"{" + b" " * 9000 + b"}", E.PAYLOAD_TOO_LARGE),
    ("em/in/digits", b"plain text", E.UNSUPPORTED_PAYLOAD),
    ("em/in/digits", b"{not json", E.INVALID_JSON),
    ("em/in/digits", b'{"id": "u", "image": "", "colour": 1}', E.UNKNOWN_FIELD),
    ("em/in/digits", b'{"id": "m"}', E.INVALID_REQUEST),
    ("em/in/digits", b'{"id": "b", "image": "%%%"}', E.INVALID_BASE64),
    ("em/in/digits", b"\xff\xd8\xff\xe0" + b"\x00" * 64, E.IMAGE_DECODE_FAILED),
    ("em/in/digits", _BIG_IMAGE, E.IMAGE_TOO_LARGE),
    ("em/in/telemetry", b"PNG", E.INPUT_KIND_MISMATCH),  # replaced by a real PNG below
    ("em/in/telemetry", b'{"id": "s", "tensor": [1, 2, 3]}', E.TENSOR_SHAPE_MISMATCH),
    ("em/in/telemetry", b'{"id": "t", "tensor": [["a"]]}', E.TENSOR_DTYPE_INVALID),
    ("em/in/telemetry", b'{"id": "v", "tensor": ' + _NAN_ROW + b"}", E.TENSOR_VALUE_INVALID),
    ("em/in/telemetry", _npy(np.zeros((200, 8), np.float32)), E.TENSOR_TOO_LARGE),
    ("em/in/telemetry", b'{"id": "big", "items": [' + b",".join([b'{"tensor": 0}'] * 65)
     + b"]}", E.BATCH_TOO_LARGE),
    ("em/in/nope", b'{"id": "n", "tensor": [1]}', E.UNKNOWN_MODEL),
    ("em/in/fragile", b'{"id": "f99", "tensor": [99]}', E.INFERENCE_FAILED),
]
LOOP_CODES = [E.OUTPUT_TOPIC_LOOP]  # an MQTT v5 response topic inside the input filter
HTTP_REFUSED_CODES = [E.NOT_FOUND, E.METHOD_NOT_ALLOWED, E.UNAUTHORIZED,
                      E.MODEL_LOAD_FAILED, E.REQUEST_TIMEOUT]
METERING_CODES = [E.METERING_UNAVAILABLE, E.METERING_BUFFER_FULL]
GATED_CODES = [E.UNLICENSED, E.REPOSITORY_UNSUPPORTED]
STOPPING_CODES = [E.OVERLOADED, E.SHUTTING_DOWN]

# Codes whose unbilled answer is checked by a test elsewhere (path::name, checked to exist).
ELSEWHERE: dict[ErrorCode, tuple[str, str]] = {
    E.ANSWER_TIMEOUT: ("tests/test_oip_v2.py::test_an_answer_nobody_waits_for_any_more_is_"
                       "neither_billed_nor_sent", "HTTP only; needs an answer timeout shorter "
                       "than the batching delay, which would time out this file's HTTP "
                       "results; that test asserts the ledger and the endpoint hold nothing"),
    E.UNKNOWN_INPUT: ("tests/test_edgehub.py::test_correlation_id_is_carried_and_errors_go_"
                      "to_errors", "edgeHub only (an input name outside EdgeHub:Inputs, "
                      "refused by the transport before the pipeline); that test runs the "
                      "fake edgeHub and asserts the ledger holds one record per result"),
    E.TENSOR_NAME_MISMATCH: ("tests/test_tensor_models.py::test_mqtt_named_inputs_answer_"
                             "like_numpy_and_only_answers_are_billed", "models with named "
                             "inputs only; that test sends each refusal over MQTT and asserts "
                             "the ledger grew by the answers alone"),
    E.OUTPUT_TOO_LARGE: ("tests/test_tensor_models.py::test_mqtt_named_inputs_answer_like_"
                         "numpy_and_only_answers_are_billed", "tensor models with dynamic "
                         "output sizes only; the same test withholds an over-large answer "
                         "and asserts it is not billed"),
    E.INTERNAL: ("tests/fast/test_pipeline_rules.py::test_an_answer_that_cannot_be_shaped_"
                 "is_an_error_and_never_billed", "only a bug answers it (a model that loaded "
                 "never reaches it); that test plants a head bug and asserts billed == "
                 "results"),
}
# Codes that can never reach a client. None today: OutputTopicLoop, once only logged, now
# goes to the error topic (the input is refused before it is served).
NEVER_SENT: dict[ErrorCode, str] = {}


def test_every_error_code_has_a_scenario() -> None:
    here = {code for *_, code in MQTT_REFUSED} | set(LOOP_CODES + HTTP_REFUSED_CODES
                                                      + METERING_CODES + GATED_CODES
                                                      + STOPPING_CODES)
    missing = [code.value for code in ErrorCode
               if code not in here and code not in ELSEWHERE and code not in NEVER_SENT]
    assert not missing, f"error codes with no billing scenario: {missing}"
    assert not here & set(ELSEWHERE) and not here & set(NEVER_SENT)
    root = Path(__file__).resolve().parent.parent
    for code, (where, why) in ELSEWHERE.items():
        path, name = where.split("::")
        assert (root / path).is_file() and why, code
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert callable(getattr(module, name, None)), f"{code.value}: {where} is gone"
        assert code.value in (root / path).read_text(), f"{where} never checks {code.value}"


# -- helpers -------------------------------------------------------------------------

billed = ledger_records


def request(module: Module, method: str, path: str, body: bytes | None = None,
            key: str | None = HTTP_KEY, timeout: float = 30) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(f"http://127.0.0.1:{module.http_port}{path}", body, headers,
                                 method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def code_of(body: dict[str, Any]) -> str:
    """The code of an HTTP error body: v2 routes answer ``{"error", "code"}``, the others
    ``{"error": {"code", ...}}``."""
    if isinstance(body.get("error"), dict):
        return str(body["error"]["code"])
    return str(body.get("code"))


def v2_tensor(value: float) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32",
                                   "data": [value]}]}).encode()


def new_module(workdir: Path, broker: Broker, billing: BillingSimulator, *extra: str,
               api_key: str = API_KEY, prefix: str = "em") -> Module:
    """A module on the file's broker; each module has its own topic ``prefix``."""
    return Module(workdir, broker.port, *extra, billing=billing.url, api_key=api_key,
                  public_key=billing.public_key_b64, prefix=prefix)


@contextlib.contextmanager
def listening(broker: Broker, prefix: str) -> Iterator[Collector]:
    c = Collector(broker.port, [f"{prefix}/results", f"{prefix}/errors"])
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = start_broker(tmp_path_factory.mktemp("broker"))
    yield b
    b.stop()


@pytest.fixture(scope="module")
def billing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BillingSimulator]:
    sim = BillingSimulator(tmp_path_factory.mktemp("billing") / "billing.db",
                           keys={API_KEY: KeyInfo()})
    sim.start()
    yield sim
    sim.stop()


@pytest.fixture
def collector(broker: Broker) -> Iterator[Collector]:
    c = Collector(broker.port, [RESULTS, ERRORS])
    yield c
    c.close()


@pytest.fixture(scope="module")
def repository_module(tmp_path_factory: pytest.TempPathFactory, broker: Broker,
                      billing: BillingSimulator) -> Iterator[Module]:
    workdir = tmp_path_factory.mktemp("repository")
    root = workdir / "repository"
    add_version(root, "digits", 1)
    add_version(root, "telemetry", 1)
    for name, build in (("fragile", fragile_model), ("slow", slow_model)):
        folder = root / name / "1"
        onnx_path = build(folder, stem="model", name=name)
        assert onnx_path.name == "model.onnx"
    module = new_module(workdir, broker, billing, f"Model:Repository={root}",
                        "Model:Default=digits", "Mqtt:ModelTopicLevel=2",
                        "Pipeline:MaxPayloadBytes=8192", "Pipeline:MaxImagePixels=2000",
                        "Pipeline:MaxTensorElements=1000", "Pipeline:MaxQueueDelayMs=20",
                        f"Http:ApiKey={HTTP_KEY}", "Http:HeaderTimeoutSeconds=1",
                        *FAST_DRAIN)
    module.start()
    yield module
    module.stop()


# -- scenarios ---------------------------------------------------------------------------

def test_every_input_error_over_mqtt_is_answered_and_never_billed(
    repository_module: Module, collector: Collector,
) -> None:
    module = repository_module
    before = billed(module)
    good = _good_png()
    answered = [  # (topic, payload): each is a result envelope and one record
        ("em/in/digits", good),
        ("em/in/telemetry", json.dumps({"id": "r1", "tensor": TELEMETRY_ROW}).encode()),
        ("em/in/any", json.dumps({"id": "r2", "model": "digits",
                                  "image": base64.b64encode(good).decode()}).encode()),
        *[("em/in/fragile", json.dumps({"id": f"f{v}", "tensor": [v]}).encode())
          for v in (1, 2, 3)],  # batched with the one the model fails on: still answered
    ]
    refused = [(topic, good if code == E.INPUT_KIND_MISMATCH else payload, code)
               for topic, payload, code in MQTT_REFUSED]
    for topic, payload in answered[:3]:
        collector.publish(topic, payload)
    for topic, payload, _ in refused[:-1]:
        collector.publish(topic, payload)
    for topic, payload in [*answered[3:5], (refused[-1][0], refused[-1][1]), answered[5]]:
        collector.publish(topic, payload)  # the fragile model's four, back to back
    loop = Properties(PacketTypes.PUBLISH)
    loop.ResponseTopic = "em/in/digits/answers"  # inside em/in/#: the result would loop
    loop.CorrelationData = b"loop-1"
    collector.publish("em/in/digits", good, properties=loop)

    results = collector.wait(RESULTS, len(answered))
    errors = collector.wait(ERRORS, len(refused) + len(LOOP_CODES))
    time.sleep(0.3)  # nothing more arrives
    assert len(collector.on(RESULTS)) == len(answered)
    assert sorted(e["error"]["code"] for e in collector.json(ERRORS)) == \
        sorted([code.value for *_, code in refused] + [c.value for c in LOOP_CODES])
    by_id = {e["id"]: e["error"]["code"] for e in errors}
    assert by_id["f99"] == "InferenceFailed" and by_id["loop-1"] == "OutputTopicLoop"
    assert {r["id"] for r in results} >= {"r1", "r2", "f1", "f2", "f3"}
    assert billed(module) - before == len(results)  # results are published after commit
    assert "mqtt_output_loop" in module.log_text()


def test_http_refusals_are_never_billed_and_http_results_are(
    repository_module: Module,
) -> None:
    module = repository_module
    before = billed(module)
    ok = [request(module, "POST", "/v2/models/fragile/infer", v2_tensor(v)) for v in (4, 5)]
    assert [status for status, _ in ok] == [200, 200], ok
    seen: list[tuple[int, str]] = []
    for method, path, body, key in [
        ("GET", "/nowhere", None, HTTP_KEY),
        ("GET", "/v2/models/fragile/infer", None, HTTP_KEY),
        ("POST", "/v2/models/fragile/infer", v2_tensor(6), None),
        ("POST", "/v2/repository/models/ghost/load", b"{}", HTTP_KEY),
    ]:
        status, answer = request(module, method, path, body, key)
        seen.append((status, code_of(answer)))
    with socket.create_connection(("127.0.0.1", module.http_port), timeout=10) as slow:
        slow.sendall(b"POST /v2/models/fragile/infer HTTP/1.1\r\nHost: x\r\n")  # never ends
        head = slow.recv(4096)
    seen.append((int(head.split()[1]), "RequestTimeout" if b"RequestTimeout" in head else ""))
    assert seen == [(404, "NotFound"), (405, "MethodNotAllowed"), (401, "Unauthorized"),
                    (400, "ModelLoadFailed"), (408, "RequestTimeout")]
    assert [code for _, code in seen] == [c.value for c in HTTP_REFUSED_CODES]
    status, answer = request(module, "POST", "/v2/models/fragile/infer", v2_tensor(99))
    assert (status, code_of(answer)) == (500, "InferenceFailed")
    assert billed(module) - before == len(ok)


def test_named_copies_arriving_while_the_first_is_in_flight_are_billed_once(
    repository_module: Module, collector: Collector,
) -> None:
    """Three identical named publishes back to back to a model that takes a while per run,
    one request per batch: the copies arrive while the first is being inferred and are
    admitted before its record is committed. All three are answered; one record."""
    module = repository_module
    before = billed(module)
    replays = module.metric("edge_module_replayed_messages_total")
    body = json.dumps({"id": "dup-1", "tensor": [2.0]}).encode()
    for _ in range(3):
        collector.publish("em/in/slow", body)
    collector.publish("em/in/slow", json.dumps({"id": "other", "tensor": [3.0]}).encode())
    results = collector.wait(RESULTS, 4, timeout=30)
    assert sorted(r["id"] for r in results) == ["dup-1", "dup-1", "dup-1", "other"]
    assert all(r["results"][0]["outputs"][0]["data"] == [2.0]
               for r in results if r["id"] == "dup-1")
    assert collector.on(ERRORS) == []
    assert billed(module) - before == 2  # dup-1 once, other once
    assert module.metric("edge_module_replayed_messages_total") - replays == 2


def test_an_http_client_that_hangs_up_while_waiting_is_not_billed(
    repository_module: Module, collector: Collector,
) -> None:
    """Three slow inputs ahead in line (one per batch), then an HTTP request whose client
    closes the connection once the module has taken it: the request is still inferred,
    but nobody reads its answer, so it is neither claimed nor billed."""
    module = repository_module
    before = billed(module)
    inferred = module.metric("edge_module_items_inferred_total")
    taken = module.metric("edge_module_messages_received_total")
    for i in range(3):
        collector.publish("em/in/slow", json.dumps({"id": f"ahead{i}",
                                                    "tensor": [float(i)]}).encode())
    wait_until(lambda: module.metric("edge_module_messages_received_total") >= taken + 3,
               10, "the slow inputs taken in first")
    body = v2_tensor(7.0)
    head = (f"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {HTTP_KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", module.http_port), timeout=10) as gone:
        gone.sendall(head + body)
        wait_until(lambda: module.metric("edge_module_messages_received_total") >= taken + 4,
                   10, "the HTTP request taken in behind the slow inputs")
    results = collector.wait(RESULTS, 3, timeout=30)
    wait_until(lambda: module.metric("edge_module_items_inferred_total") >= inferred + 4, 30,
               "the abandoned request inferred")
    time.sleep(0.3)  # its commit, had it been claimed, is done by now
    assert sorted(r["id"] for r in results) == ["ahead0", "ahead1", "ahead2"]
    assert billed(module) - before == 3


def test_a_full_disk_and_a_full_ledger_refuse_unbilled(
    tmp_path: Path, broker: Broker, billing: BillingSimulator,
) -> None:
    results_topic, errors_topic = "md/results", "md/errors"
    with mounted_tmpfs(tmp_path / "data", "3m") as data, listening(broker, "md") as collector:
        module = new_module(tmp_path, broker, billing, "Metering:MaxPendingRecords=5",
                            *FAST_DRAIN, prefix="md").start()
        ballast = Ballast(data)
        try:
            billing.set_fault("busy", retry_after=60)  # nothing drains: the backlog stays
            x = digits_split()[1]

            def send(prefix: str, count: int) -> None:
                for i in range(count):
                    collector.publish("md/in/m", json.dumps(
                        {"id": f"{prefix}{i}",
                         "tensor": x[i].reshape(1, 8, 8).tolist()}).encode())

            ballast.fill()
            send("d", 2)
            errors = collector.wait(errors_topic, 2)
            ballast.remove()
            wait_until(lambda: module.http("/ready")[0] == 200, 15, "ready after space returned")
            send("c", 7)
            results = collector.wait(results_topic, 5)
            errors = collector.wait(errors_topic, 4)
            time.sleep(0.3)
            codes = {e["id"]: e["error"]["code"] for e in collector.json(errors_topic)}
            assert {k: v for k, v in codes.items() if k.startswith("d")} == \
                {"d0": "MeteringUnavailable", "d1": "MeteringUnavailable"}
            assert sorted(v for k, v in codes.items() if k.startswith("c")) == \
                ["MeteringBufferFull"] * 2
            assert len(collector.on(results_topic)) == len(results) == 5
            assert {e["error"]["code"] for e in errors} == {c.value for c in METERING_CODES}
            assert billed(module) == 5
        finally:
            billing.set_fault("none")
            ballast.remove()
            module.stop()


def test_a_gated_module_refuses_unbilled(
    tmp_path: Path, broker: Broker, billing: BillingSimulator,
) -> None:
    revoked = "revoked-key-0123456789"
    billing.state.keys[revoked] = KeyInfo("edge-module", revoked=True)
    module = new_module(tmp_path, broker, billing, api_key=revoked,
                        prefix="gt").start(wait_ready=False)
    collector = Collector(broker.port, ["gt/results", "gt/errors"])
    try:
        module.wait_serving_or_gated()
        collector.publish("gt/in/g", _good_png())
        (error,) = collector.wait("gt/errors", 1)
        body = json.dumps({"inputs": [{"name": "image", "shape": [1, 1, 8, 8],
                                       "datatype": "FP32", "data": [0.5] * 64}]}).encode()
        status, answer = request(module, "POST", "/v2/models/digits/infer", body, key=None)
        index_status, index = request(module, "POST", "/v2/repository/index", b"{}", key=None)
        seen = [error["error"]["code"], code_of(answer), code_of(index)]
        assert (status, index_status) == (403, 501)
        assert seen == [E.UNLICENSED.value, E.UNLICENSED.value, E.REPOSITORY_UNSUPPORTED.value]
        assert set(seen) == {c.value for c in GATED_CODES}
        assert collector.on("gt/results") == []
        assert billed(module) == 0
    finally:
        collector.close()
        module.stop()


def test_a_burst_and_a_shutdown_refuse_unbilled_and_bill_every_answer_delivered(
    tmp_path: Path, broker: Broker, billing: BillingSimulator,
) -> None:
    """The slow model behind a one-slot intake: a burst of HTTP requests finds the intake
    full (``Overloaded``); MQTT inputs queue behind them (back-pressure, never refused); a
    SIGTERM while they are in flight lets the ones taken finish, and an HTTP request
    arriving meanwhile gets ``ShuttingDown``. The ledger holds one record per HTTP 200
    and per MQTT result; the MQTT inputs not taken stay with the broker, unbilled."""
    folder = tmp_path / "models"
    model = slow_model(folder)
    module = new_module(tmp_path, broker, billing, f"Model:Path={model}",
                        "Pipeline:IntakeQueue=1", "Pipeline:MaxBatchSize=1",
                        "Pipeline:MaxQueueDelayMs=0", "Http:AnswerTimeoutSeconds=60",
                        *FAST_DRAIN, prefix="sd").start()
    answers: list[tuple[int, str]] = []
    lock = threading.Lock()
    collector = Collector(broker.port, ["sd/results", "sd/errors"])

    def one(value: float, into: list[tuple[int, str]]) -> None:
        try:
            status, body = request(module, "POST", "/v2/models/slow/infer",
                                   v2_tensor(value), key=None, timeout=60)
        except (urllib.error.URLError, OSError):
            status, body = 0, {"code": "gone"}  # the server had stopped: nothing to bill
        with lock:
            into.append((status, "" if status == 200 else code_of(body)))

    late: list[tuple[int, str]] = []
    try:
        burst = [threading.Thread(target=one, args=(float(i), answers)) for i in range(16)]
        for thread in burst:
            thread.start()
        wait_until(lambda: any(code == "Overloaded" for _, code in list(answers)), 20,
                   "a request refused for a full intake")
        taken = module.metric("edge_module_messages_received_total")
        for i in range(3):
            collector.publish("sd/in/x", json.dumps({"id": f"q{i}", "tensor": [i]}).encode())
        wait_until(lambda: module.metric("edge_module_messages_received_total") > taken, 10,
                   "an MQTT input taken in")
        assert module.process is not None
        module.process.send_signal(signal.SIGTERM)
        # Requests keep coming while the module stops, each on its own thread (one that is
        # taken in waits for the whole queue): those arriving once it stops taking input
        # get ShuttingDown.
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and module.exited() is None and \
                not any(code == "ShuttingDown" for _, code in list(late)):
            sender = threading.Thread(target=one, args=(1.0, late))
            sender.start()
            burst.append(sender)
            time.sleep(0.05)
        for thread in burst:
            thread.join(60)
        assert module.wait_exit(30) == 0
        time.sleep(0.5)  # the answers the broker acknowledged reach the collector
        mqtt_results = collector.json("sd/results")
        assert collector.on("sd/errors") == []  # MQTT inputs are never refused for stopping
    finally:
        collector.close()
        module.stop()
    codes = {code for _, code in answers + late if code and code != "gone"}
    assert codes == {c.value for c in STOPPING_CODES}, answers + late
    delivered = sum(1 for status, _ in answers + late if status == 200)
    assert delivered >= 1 and len(mqtt_results) >= 1
    assert billed(module) == delivered + len(mqtt_results)
