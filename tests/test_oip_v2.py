"""OIP v2 (KServe v2 / Triton) over HTTP, with Triton's own client against the module process.

Health, server and model metadata, JSON and binary inference for the digits classifier
(JPEG/PNG files as BYTES, and float tensors), the telemetry model (tensor input) and a
tensor-head model; the documented status codes for unknown models, bad shapes, an
unlicensed module, a full intake and a body over the limit; statistics; the repository
routes answering 501 on a single-model module; one usage record per answered request, none
for failures, with MQTT and HTTP requests served together.
"""

from __future__ import annotations

import base64
import json
import shutil
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from edge_module.config import BUILTIN_MODELS
from simulator.billing import BillingSimulator, KeyInfo
from simulator.datasets import digits_split
from tests.support import Collector, Module, digit_png, wait_until

FAST_DRAIN = ("Metering:MaxDelaySeconds=0.2", "Metering:MaxBackoffSeconds=1",
              "Metering:TimeoutSeconds=2")


def client(module: Module) -> th.InferenceServerClient:
    return th.InferenceServerClient(f"127.0.0.1:{module.http_port}", network_timeout=20.0)


def billed(billing: BillingSimulator) -> int:
    return int(billing.totals()["records"])


def post(module: Module, path: str, body: bytes, headers: dict[str, str] | None = None
         ) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{module.http_port}{path}", body,
                                     {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=20) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def digits() -> tuple[np.ndarray, np.ndarray]:
    _, x_test, _, y_test = digits_split()
    return x_test, y_test


def image_input(files: list[bytes], binary: bool, name: str = "image") -> th.InferInput:
    """JPEG/PNG files as a BYTES tensor: raw in binary data, base64 strings in JSON."""
    tensor = th.InferInput(name, [len(files)], "BYTES")
    values = files if binary else [base64.b64encode(f).decode() for f in files]
    tensor.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
    return tensor


def test_health_and_metadata_for_triton_clients(start_module: Callable[..., Module]) -> None:
    module = start_module()
    triton = client(module)
    assert triton.is_server_live() and triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert meta["name"] == "edge-module"
    assert {"binary_tensor_data", "statistics"} <= set(meta["extensions"])
    assert "model_repository" not in meta["extensions"]  # one fixed model here
    assert triton.is_model_ready("digits") and triton.is_model_ready("digits", "1.0.0")
    assert not triton.is_model_ready("nope")
    model = triton.get_model_metadata("digits")
    assert model["name"] == "digits" and model["versions"] == ["1.0.0"]
    assert model["inputs"][0]["name"] == "image" and model["inputs"][0]["datatype"] == "BYTES"
    assert [o["name"] for o in model["outputs"]] == ["label", "score", "result"]
    assert triton.get_model_metadata("digits", "1.0.0")["name"] == "digits"
    with pytest.raises(InferenceServerException) as unknown:
        triton.get_model_metadata("nope")
    assert unknown.value.status() == "404" and "UnknownModel" in str(unknown.value)
    # repository routes on a single-model module: a coded 501, not a 404
    status, _, body = post(module, "/v2/repository/index", b"{}")
    assert status == 501 and json.loads(body)["code"] == "RepositoryUnsupported"
    status, _, body = post(module, "/v2/repository/models/digits/load", b"{}")
    assert status == 501


def test_json_and_binary_inference_of_images_and_tensors_is_metered_per_request(
    start_module: Callable[..., Module], billing: BillingSimulator,
) -> None:
    module = start_module(*FAST_DRAIN)
    triton = client(module)
    x_test, y_test = digits()
    files = [digit_png(x_test[i]) for i in range(4)]
    answers = 0
    for binary in (False, True):
        outputs = [th.InferRequestedOutput(n, binary_data=binary) for n in ("label", "score")]
        result = triton.infer("digits", [image_input(files, binary)], outputs=outputs)
        labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]
        assert sum(int(a) == b for a, b in zip(labels, y_test[:4], strict=True)) >= 3
        scores = result.as_numpy("score")
        assert scores is not None and scores.shape == (4,) and (scores > 0).all()
        answers += 1
    # a float tensor of the preprocessed shape, JSON and binary, with a version in the URL
    batch = (x_test[:3].reshape(3, 1, 8, 8) / 16.0 * 255 / 255).astype(np.float32)
    for binary in (False, True):
        tensor = th.InferInput("image", [3, 1, 8, 8], "FP32")
        tensor.set_data_from_numpy(batch, binary_data=binary)
        result = triton.infer("digits", [tensor], model_version="1.0.0",
                              outputs=[th.InferRequestedOutput("result", binary_data=binary)])
        parsed = [json.loads(r) for r in result.as_numpy("result")]
        assert len(parsed) == 3 and all("topK" in r for r in parsed)
        answers += 1
    wait_until(lambda: billed(billing) == answers, 20, f"{answers} records billed")
    quantities = sorted(r["meter"]["quantity"] for r in billing.store.records())
    assert quantities == [3, 3, 4, 4]
    # errors: the documented status, the module's code in the body, nothing billed
    bad = th.InferInput("image", [2, 1, 8, 7], "FP32")
    bad.set_data_from_numpy(np.zeros((2, 1, 8, 7), dtype=np.float32))
    with pytest.raises(InferenceServerException) as shape:
        triton.infer("digits", [bad])
    assert shape.value.status() == "400" and "TensorShapeMismatch" in str(shape.value)
    with pytest.raises(InferenceServerException) as unknown:
        triton.infer("nope", [image_input(files[:1], True)])
    assert unknown.value.status() == "404" and "UnknownModel" in str(unknown.value)
    with pytest.raises(InferenceServerException) as garbage:
        triton.infer("digits", [image_input([b"\xff\xd8\xffnot a jpeg"], True)])
    assert garbage.value.status() == "400" and "ImageDecodeFailed" in str(garbage.value)
    stats = triton.get_inference_statistics("digits")["model_stats"][0]
    assert stats["name"] == "digits" and stats["version"] == "1.0.0"
    assert stats["inference_stats"]["success"]["count"] == answers
    assert stats["inference_stats"]["fail"]["count"] >= 2  # the bad shape and the bad image
    assert stats["inference_count"] == 14
    time.sleep(1.0)  # a failure would have been billed by now
    assert billed(billing) == answers


def test_tensor_models_answer_over_json_and_binary(
    start_module: Callable[..., Module], tmp_path: Path,
) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(BUILTIN_MODELS / "telemetry.onnx", folder / "pump.onnx")
    descriptor = json.loads((BUILTIN_MODELS / "telemetry.json").read_text())
    descriptor.update(name="pump", head="tensor")
    (folder / "pump.json").write_text(json.dumps(descriptor))
    module = start_module(f"Model:Path={folder / 'pump.onnx'}")
    triton = client(module)
    meta = triton.get_model_metadata("pump")
    assert meta["inputs"] == [{"name": "vector", "datatype": "FP32", "shape": [-1, 8]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 4]}]
    config = triton.get_model_config("pump")  # what perf_analyzer reads
    assert config["max_batch_size"] >= 1
    assert config["input"] == [{"name": "vector", "data_type": "TYPE_FP32", "dims": [8]}]
    assert config["output"] == [{"name": "probabilities", "data_type": "TYPE_FP32",
                                 "dims": [4]}]
    rows = np.random.default_rng(3).normal(size=(5, 8)).astype(np.float32)
    answers = []
    for binary in (False, True):
        tensor = th.InferInput("vector", [5, 8], "FP32")
        tensor.set_data_from_numpy(rows, binary_data=binary)
        result = triton.infer("pump", [tensor], outputs=[
            th.InferRequestedOutput("probabilities", binary_data=binary)])
        out = result.as_numpy("probabilities")
        assert out is not None and out.shape == (5, 4)
        assert np.allclose(out.sum(axis=1), 1.0, atol=1e-4)
        answers.append(out)
    assert np.allclose(answers[0], answers[1], atol=1e-5)
    with pytest.raises(InferenceServerException) as kind:
        triton.infer("pump", [image_input([digit_png(digits()[0][0])], True, "vector")])
    assert kind.value.status() == "400" and "InputKindMismatch" in str(kind.value)


def test_unlicensed_overloaded_and_too_large_map_to_their_status_codes(
    start_module: Callable[..., Module], billing: BillingSimulator,
) -> None:
    revoked = "revoked-key-0123456789"
    billing.state.keys[revoked] = KeyInfo("edge-module", revoked=True)
    module = start_module("Http:MaxBodyBytes=4096", api_key=revoked, wait_ready=False)
    module.wait_serving_or_gated()
    x_test, _ = digits()
    triton = client(module)
    with pytest.raises(InferenceServerException) as gated:
        triton.infer("digits", [image_input([digit_png(x_test[0])], True)])
    assert gated.value.status() == "403" and "Unlicensed" in str(gated.value)
    body = json.dumps({"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                   "data": [0.5] * 64}]}).encode()
    status, _, answer = post(module, "/v2/models/digits/infer", body)
    refusal = json.loads(answer)
    assert status == 403 and refusal["code"] == "Unlicensed" and refusal["status"]
    assert refusal["error"].startswith("Unlicensed: ") and refusal["fix"]
    big = json.dumps({"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                  "data": [0.5] * 2000}]}).encode()
    status, _, answer = post(module, "/v2/models/digits/infer", big)
    assert status == 413 and json.loads(answer)["code"] == "PayloadTooLarge"
    assert billed(billing) == 0


def test_a_full_intake_answers_503_with_retry_after_at_once(
    start_module: Callable[..., Module],
) -> None:
    # One decode worker, a one-slot intake and a long batching delay: a burst of requests
    # finds the intake full; those are refused at once, the others answered.
    module = start_module("Pipeline:IntakeQueue=1", "Pipeline:MaxQueueDelayMs=200",
                          "Pipeline:MaxBatchSize=64")
    x_test, _ = digits()
    body = json.dumps({"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                   "data": (x_test[0] / 16).tolist()}]}).encode()
    results: list[tuple[int, dict[str, str], bytes]] = []
    lock = threading.Lock()

    def one() -> None:
        answer = post(module, "/v2/models/digits/infer", body)
        with lock:
            results.append(answer)

    threads = [threading.Thread(target=one) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    statuses = [status for status, _, _ in results]
    assert len(statuses) == 40 and set(statuses) <= {200, 503}, statuses
    assert 200 in statuses and 503 in statuses, statuses
    for status, headers, answer in results:
        if status == 503:
            assert json.loads(answer)["code"] == "Overloaded"
            assert {k.lower(): v for k, v in headers.items()}["retry-after"] == "1"


def test_mqtt_and_http_at_once_are_batched_together_and_billed_once_each(
    start_module: Callable[..., Module], collector: Collector, billing: BillingSimulator,
) -> None:
    # A long batching window: inputs arriving together from both transports share a batch.
    module = start_module(*FAST_DRAIN, "Pipeline:MaxQueueDelayMs=1000",
                          "Pipeline:MaxBatchSize=64")
    x_test, _ = digits()
    http_answers: list[int] = []
    lock = threading.Lock()

    def http_side(count: int, offset: int) -> None:
        triton = client(module)
        for i in range(count):
            tensor = th.InferInput("image", [1, 1, 8, 8], "FP32")
            tensor.set_data_from_numpy(
                (x_test[offset + i].reshape(1, 1, 8, 8) / 16).astype(np.float32))
            labels = triton.infer("digits", [tensor]).as_numpy("label")
            with lock:
                http_answers.append(0 if labels is None else len(labels))

    def burst(http_clients: int, per_client: int, mqtt: int, tag: str) -> None:
        workers = [threading.Thread(target=http_side, args=(per_client, 10 * c))
                   for c in range(http_clients)]
        for worker in workers:
            worker.start()
        for i in range(mqtt):
            body: dict[str, Any] = {"id": f"{tag}{i}",
                                    "tensor": (x_test[i] / 16).reshape(1, 8, 8).tolist()}
            collector.publish(f"em/in/{tag}", json.dumps(body).encode())
        for worker in workers:
            worker.join(60)

    burst(5, 1, 5, "a")
    assert collector.wait("em/results", 5, timeout=30) and http_answers == [1] * 5
    assert module.metric("edge_module_items_inferred_total") == 10
    assert module.metric("edge_module_batch_size_count") == 1  # one batch, both transports
    burst(4, 5, 20, "b")
    assert len(http_answers) == 25 and sum(http_answers) == 25
    assert len(collector.wait("em/results", 25, timeout=30)) == 25
    wait_until(lambda: billed(billing) == 50, 20, "every answer billed")
    time.sleep(0.5)
    assert billed(billing) == 50
    assert module.metric("edge_module_items_inferred_total") == 50


def test_an_answer_nobody_waits_for_any_more_is_neither_billed_nor_sent(
    start_module: Callable[..., Module], billing: BillingSimulator,
) -> None:
    # The batcher holds a lone request for 800 ms; the client gives up after 200 ms: 504
    # AnswerTimeout, and the late answer is dropped before its usage record is written.
    module = start_module(*FAST_DRAIN, "Http:AnswerTimeoutSeconds=0.2",
                          "Pipeline:MaxQueueDelayMs=800", "Pipeline:MaxBatchSize=64")
    body = json.dumps({"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                   "data": [0.25] * 64}]}).encode()
    for _ in range(3):
        status, headers, answer = post(module, "/v2/models/digits/infer", body)
        assert {k.lower(): v for k, v in headers.items()}.get("retry-after") == "1"
        assert status == 504 and json.loads(answer)["code"] == "AnswerTimeout"
    wait_until(lambda: module.metric("edge_module_items_inferred_total") == 3, 10,
               "the abandoned requests inferred")
    time.sleep(1.0)  # past the metering flush interval
    assert module.metric("edge_module_ledger_pending_records") == 0
    assert billed(billing) == 0
    assert "http_answer_timeout" in module.log_text()


def test_the_model_repository_through_tritonclient(
    tmp_path: Path, start_module: Callable[..., Module], billing: BillingSimulator,
) -> None:
    """The real repository (two digits versions, telemetry) behind the v2 repository
    extension: index, per-version inference, unload (then UnknownModel, unbilled), load."""
    from tests.fast.test_repository import add_version

    root = tmp_path / "repository"
    add_version(root, "digits", 1)
    add_version(root, "digits", 2)
    (root / "digits" / "config.json").write_text(json.dumps({"versionPolicy": {"all": {}}}))
    add_version(root, "telemetry", 1)
    module = start_module(f"Model:Repository={root}", "Model:Default=digits",
                          "Metering:MaxDelaySeconds=0.2")
    triton = client(module)
    assert "model_repository" in triton.get_server_metadata()["extensions"]
    index = {(m["name"], m.get("version")): m["state"]
             for m in triton.get_model_repository_index()}
    assert index[("digits", "1")] == index[("digits", "2")] == "READY"
    assert index[("telemetry", "1")] == "READY"
    x, y = digits()
    files = [digit_png(x[0])]
    for version in ("1", "2"):
        result = triton.infer("digits", [image_input(files, True)], model_version=version)
        assert result.as_numpy("label").astype(str).tolist() == [str(y[0])]
    triton.unload_model("telemetry")
    assert not triton.is_model_ready("telemetry")
    before = billed(billing)
    tensor = th.InferInput("vector", [1, 8], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 8), dtype=np.float32))
    with pytest.raises(InferenceServerException) as gone:
        triton.infer("telemetry", [tensor])
    assert gone.value.status() == "404" and "UnknownModel" in str(gone.value)
    triton.load_model("telemetry")
    wait_until(lambda: triton.is_model_ready("telemetry"), 20, "telemetry loaded again")
    wait_until(lambda: billed(billing) == before, 5, "nothing billed for the refusal")
    wait_until(lambda: billed(billing) == 2, 10, "the two answers billed")
