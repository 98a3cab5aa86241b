"""Tensor models with several named inputs and dynamic sizes, served end to end.

A small ONNX graph built here with ``onnx.helper``: ``a`` (float32 ``[N, L]``) and
``b`` (int64 ``[N, L]``, the same named size ``L``) answer ``sum = a + b`` (``[N, L]``)
and ``norm = ||sum||`` per row (``[N]``). Beside it, a real third-party map model, the
PP-OCRv4 text detector (DBNet) from ``rapidocr-onnxruntime`` 1.4.4, fetched into
.cache/ (``bench/fetch.py``). Both sit in one model repository, served by one module
process (module-scoped) over a real mosquitto and over OIP v2 (tritonclient, HTTP JSON
and binary, and gRPC):

* a descriptor that does not fit the graph is refused at load, naming its inputs and
  outputs; a ``.npz`` whose header declares too much is refused before it is inflated;
* answers equal numpy's, as JSON lists and as ``.npy`` (``"output": "npy"``), from JSON
  ``inputs`` and from ``.npz`` bytes; messages of different sizes sent at once are all
  answered right (only equal shapes share a batch);
* one usage record per answered request, none for a wrong input name, a wrong dtype,
  mismatched shapes or an answer over ``maxElements``, each with its documented code;
* a dynamic size past the descriptor's ``maxShape`` or of zero length is refused by
  its declared shape (``maxShape``/``minShape`` of the wrong length, off a fixed size,
  are refused at load; none given: a default bound and a warning), and the detector's
  map past ``[3, 1024, 1024]`` never runs, over MQTT, v2 HTTP and gRPC, unbilled;
* DBNet's map for a real image equals a direct onnxruntime run.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import skimage.data
import tritonclient.grpc as tg
import tritonclient.http as th
from onnx import TensorProto, helper
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from structlog.testing import capture_logs
from tritonclient.utils import InferenceServerException

from bench.fetch import text_detector
from edge_module.exceptions import ModelError
from edge_module.inference.codecs import Codec, Limits, RequestError
from edge_module.inference.descriptor import DEFAULT_DYNAMIC_ELEMENTS
from edge_module.inference.models import Model
from tests.models import save_graph
from tests.support import (
    ServedRepository,
    serve_repository,
    wait_until,
)

RESULTS, ERRORS = "em/results", "em/errors"
PAIR = {
    "name": "pair", "version": "1",
    "inputs": [{"name": "a", "shape": [-1], "dtype": "float32", "maxShape": [2048]},
               {"name": "b", "shape": [-1], "dtype": "int64", "maxShape": [2048]}],
    "head": "tensor", "headOptions": {"maxElements": 1000},
    "metering": {"meterName": "pair.tensor", "apiType": "pair"},
}


def pair_graph(path: Path) -> Path:
    """``sum = a + float(b)`` and ``norm = sqrt(sum(sum^2, axis=1))``; ``L`` ties a and b."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["a", "bf"], ["sum"]),
         helper.make_node("ReduceL2", ["sum"], ["norm"], axes=[1], keepdims=0)],
        "pair",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", "L"]),
         helper.make_tensor_value_info("b", TensorProto.INT64, ["N", "L"])],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["N", "L"]),
         helper.make_tensor_value_info("norm", TensorProto.FLOAT, ["N"])])
    return save_graph(graph, path, opset=13)


def expected(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    total = a.astype(np.float32) + b.astype(np.float32)
    return total, np.sqrt((total.astype(np.float64) ** 2).sum(axis=-1)).astype(np.float32)


def npz(**arrays: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def inputs_json(a: np.ndarray, b: np.ndarray, **extra: Any) -> bytes:
    return json.dumps({**extra, "inputs": {
        "a": {"shape": list(a.shape), "dtype": str(a.dtype), "data": a.ravel().tolist()},
        "b": {"shape": list(b.shape), "dtype": str(b.dtype), "data": b.ravel().tolist()},
    }}).encode()


def outputs_of(result: dict[str, Any]) -> dict[str, np.ndarray]:
    """One item's named tensors, from JSON lists or base64 .npy."""
    tensors = {}
    for out in result["outputs"]:
        if "npy" in out:
            value = np.load(io.BytesIO(base64.b64decode(out["npy"])), allow_pickle=False)
        else:
            value = np.asarray(out["data"], dtype=out["dtype"])
        assert list(value.shape) == out["shape"] and str(value.dtype) == out["dtype"]
        tensors[out["name"]] = value
    return tensors


def dbnet_image() -> np.ndarray:
    """scikit-image's scanned page as DBNet takes it (rapidocr's preprocessing): BGR,
    192x384 (multiples of 32), ``(pixel / 255 - 0.5) / 0.5``, CHW float32."""
    gray = cv2.resize(skimage.data.page(), (384, 192), interpolation=cv2.INTER_LINEAR)
    image = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR).astype(np.float32)
    return np.ascontiguousarray(((image / 255.0 - 0.5) / 0.5).transpose(2, 0, 1))


# -- load-time checks and bounded intake (in process) ------------------------------------

def test_named_inputs_are_checked_against_the_graph_at_load(tmp_path: Path) -> None:
    path = pair_graph(tmp_path / "pair.onnx")

    def refusal(**changes: Any) -> str:
        (tmp_path / "pair.json").write_text(json.dumps({**PAIR, **changes}))
        with pytest.raises(ModelError) as refused:
            Model(path)
        return str(refused.value)

    wrong_dtype = refusal(inputs=[PAIR["inputs"][0], {"name": "b", "shape": [-1]}])
    assert "input b is tensor(int64), the descriptor says float32" in wrong_dtype
    assert "a ['N', 'L'] tensor(float)" in wrong_dtype and "norm ['N']" in wrong_dtype
    assert "b would be missing" in refusal(inputs=[PAIR["inputs"][0]])
    assert "not in the graph" in refusal(inputs=[*PAIR["inputs"], {"name": "c", "shape": [1]}])
    assert "has rank 2" in refusal(inputs=[{"name": "a", "shape": [-1, 2]},
                                           PAIR["inputs"][1]])
    assert "exactly one of input" in refusal(input={"name": "a", "kind": "tensor",
                                                    "shape": [3]})
    # the bounds of each dynamic size: aligned with shape, fixed sizes repeated, around
    # probeShape; the refusal names the descriptor, the input and the field
    b = PAIR["inputs"][1]
    assert "inputs.0: Value error, maxShape [8, 8] has 2 sizes; shape [-1] has 1" in \
        refusal(inputs=[{"name": "a", "shape": [-1], "maxShape": [8, 8]}, b])
    assert "maxShape [8, 1]: shape [-1, 2] fixes dimension 1 to 2; write 2 there, not 1" in \
        refusal(inputs=[{"name": "a", "shape": [-1, 2], "maxShape": [8, 1]}, b])
    assert "maxShape [0]: dimension 0 is dynamic; its largest size must be >= 1" in \
        refusal(inputs=[{"name": "a", "shape": [-1], "maxShape": [0]}, b])
    assert "minShape [9] exceeds maxShape [8]" in \
        refusal(inputs=[{"name": "a", "shape": [-1], "minShape": [9], "maxShape": [8]}, b])
    assert "probeShape [16] must lie between minShape [1] and maxShape [8]" in \
        refusal(inputs=[{"name": "a", "shape": [-1], "probeShape": [16], "maxShape": [8]}, b])
    # no maxShape: served within the default bound, with a warning at load
    (tmp_path / "pair.json").write_text(json.dumps(
        {**PAIR, "inputs": [{"name": "a", "shape": [-1]}, b]}))
    with capture_logs() as logs:
        unbounded = Model(path)
    assert unbounded.named_inputs[0].bounds() == ((1,), (DEFAULT_DYNAMIC_ELEMENTS,))
    assert [(e["event"], e["input"], e["default_max_shape"]) for e in logs
            if e["log_level"] == "warning"] == [
        ("model_input_unbounded", "a", [DEFAULT_DYNAMIC_ELEMENTS])]
    (tmp_path / "pair.json").write_text(json.dumps(PAIR))
    model = Model(path)
    assert model.dim_names == {"a": ("L",), "b": ("L",)}
    codec = Codec(model, Limits(1 << 20, 8, max_tensor_elements=1000))
    # a size past maxShape (2048) or of zero length, refused by the header's shape
    for payload, code, words in (
            (npz(a=np.ones(2049, np.float32), b=np.ones(2049, np.int64)), "TensorTooLarge",
             "input a has size 2049 at dimension 0 of its item shape [2049] (batch left out); "
             "the model takes at most 2048 there (maxShape [2048])"),
            (npz(a=np.ones((2, 0), np.float32), b=np.ones((2, 0), np.int64)),
             "TensorShapeMismatch", "input a has size 0 at dimension 0 of its item shape [0] "
             "(batch left out); the model takes at least 1 there (minShape [1]); a "
             "zero-length size needs minShape 0 there")):
        with pytest.raises(RequestError) as outside:
            codec.decode(payload)
        assert (outside.value.code, outside.value.message) == (code, words)
    one = codec.decode(inputs_json(np.ones((2, 3), np.float32), np.ones((2, 3), np.int64)))
    other = codec.decode(npz(a=np.ones(5, np.float32), b=np.arange(5, dtype=np.int32)))
    assert len(one.items) == 2 and one.shape_key == ((3,), (3,))
    assert len(other.items) == 1 and other.shape_key == ((5,), (5,))  # int32 -> int64: safe
    assert other.items[0]["b"].dtype == np.int64  # type: ignore[index]
    # a deflated member declaring 4 M elements: refused by its header, never inflated
    bomb = io.BytesIO()
    np.savez_compressed(bomb, a=np.zeros(4_000_000, np.float32), b=np.zeros(4_000_000, np.int8))
    assert len(bomb.getvalue()) < 100_000
    with pytest.raises(RequestError) as large:
        codec.decode(bomb.getvalue())
    assert large.value.code == "TensorTooLarge"
    # a member whose zip entry holds more bytes than its header declares
    lying = io.BytesIO()
    with zipfile.ZipFile(lying, "w") as archive:
        archive.writestr("a.npy", npy(np.ones(3, np.float32)) + b"\0" * 64)
        archive.writestr("b.npy", npy(np.ones(3, np.int64)))
    with pytest.raises(RequestError) as corrupt:
        codec.decode(lying.getvalue())
    assert corrupt.value.code == "UnsupportedPayload" and "declares shape" in corrupt.value.message
    # many members: refused by the end record's count, before the directory is parsed
    crowded = io.BytesIO()
    with zipfile.ZipFile(crowded, "w") as archive:
        for i in range(50):
            archive.writestr(f"m{i}.npy", b"")
    with pytest.raises(RequestError) as many:
        codec.decode(crowded.getvalue())
    assert many.value.code == "UnsupportedPayload" and "declares 50 members" in many.value.message


# -- one module serving the repository over MQTT, HTTP and gRPC --------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedRepository]:
    root = tmp_path_factory.mktemp("tensor")
    repository = root / "repository"
    pair_graph(repository / "pair" / "1" / "model.onnx")
    (repository / "pair" / "1" / "model.json").write_text(json.dumps(PAIR))
    detector = text_detector()
    (repository / "textdet" / "4").mkdir(parents=True)
    shutil.copy(detector, repository / "textdet" / "4" / "model.onnx")
    shutil.copy(detector.with_suffix(".json"), repository / "textdet" / "4" / "model.json")
    with serve_repository(root, repository, "Pipeline:MaxPayloadBytes=2000000",
                          "Pipeline:MaxTensorElements=300000",
                          "Pipeline:MaxQueueDelayMs=20") as served:
        yield served


def test_mqtt_named_inputs_answer_like_numpy_and_only_answers_are_billed(
    served: ServedRepository,
) -> None:
    rng = np.random.default_rng(7)
    before = served.billed()
    sent: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def pair(rows: int | None, length: int) -> tuple[np.ndarray, np.ndarray]:
        shape = (length,) if rows is None else (rows, length)
        return (rng.normal(size=shape).astype(np.float32),
                rng.integers(-5, 5, size=shape).astype(np.int64))

    sent["m-rows"] = pair(2, 3)
    served.collector.publish("em/in", inputs_json(*sent["m-rows"], id="m-rows"))
    sent["m-npy"] = pair(None, 5)
    served.collector.publish("em/in", inputs_json(*sent["m-npy"], id="m-npy",
                                                    model="pair", output="npy"))
    # a burst of two sizes at once: each message answered by a batch of its own size
    for i in range(8):
        sent[f"m-burst{i}"] = pair(1, 2 if i % 2 else 6)
        served.collector.publish("em/in", inputs_json(*sent[f"m-burst{i}"], id=f"m-burst{i}"),
                                 qos=0)
    wait_until(lambda: len(served.results("m-")) == 10, 15, "10 answers")
    results = {r["id"]: r for r in served.results("m-")}
    for request_id, (a, b) in sent.items():
        answer = results[request_id]
        assert answer["model"]["name"] == "pair"
        items = [outputs_of(r) for r in answer["results"]]
        total, norm = expected(a, b)
        rows = total.reshape(len(items), -1)
        for item, row, n in zip(items, rows, norm.reshape(-1), strict=True):
            assert np.allclose(item["sum"], row, atol=1e-6)
            assert item["norm"].shape == () and np.isclose(item["norm"], n, rtol=1e-5)
    assert all("npy" in o for o in results["m-npy"]["results"][0]["outputs"])
    # .npz bytes on the model's topic level: no JSON, the default answer form
    a, b = pair(1, 4)
    served.collector.publish("em/in/pair", npz(a=a, b=b))
    wait_until(lambda: any(r["model"]["name"] == "pair" and not r["id"].startswith("m-")
                           for r in served.collector.json(RESULTS)), 15, "the .npz answer")
    binary = next(r for r in served.collector.json(RESULTS) if not r["id"].startswith("m-")
                  and r["model"]["name"] == "pair")
    assert np.allclose(outputs_of(binary["results"][0])["sum"], expected(a, b)[0])
    answers = 11
    wait_until(lambda: served.billed() == before + answers, 20, f"{answers} records")
    quantities = sorted(r["meter"]["quantity"] for r in served.billing.store.records()
                        if r["meter"]["name"] == "pair.tensor")
    assert quantities.count(2) == 1 and len(quantities) == answers
    # refusals: each its documented code, none billed
    a3, b3 = pair(1, 3)
    refused = {
        "e-name": (json.dumps({"id": "e-name", "inputs": {
            "a": {"data": [[1.0, 2.0]]}, "c": {"data": [[1, 2]]}}}).encode(),
            "TensorNameMismatch"),
        "e-dtype": (inputs_json(a3, b3.astype(np.float32), id="e-dtype"), "TensorDtypeInvalid"),
        "e-tied": (inputs_json(a3, pair(1, 4)[1], id="e-tied"), "TensorShapeMismatch"),
        "e-rows": (inputs_json(pair(2, 3)[0], b3, id="e-rows"), "TensorShapeMismatch"),
        "e-output": (inputs_json(a3, b3, id="e-output", output="npz"), "InvalidRequest"),
        "e-image": (json.dumps({"id": "e-image", "image": "aGk="}).encode(),
                    "InputKindMismatch"),
        # 1,200 + 1 values per item answered; maxElements is 1,000: withheld, not billed
        "e-big": (inputs_json(*pair(1, 1200), id="e-big"), "OutputTooLarge"),
    }
    for payload, _ in refused.values():
        served.collector.publish("em/in", payload)
    wait_until(lambda: len(served.errors("e-")) == len(refused), 15, "every refusal")
    assert served.errors("e-") == {k: code for k, (_, code) in refused.items()}
    raw = served.module.log_tail()
    assert "answer_shaping_failed" not in raw
    time.sleep(1.0)  # a refused input would have been billed by now
    assert served.billed() == before + answers


def test_v2_http_and_grpc_map_several_input_tensors_to_the_named_inputs(
    served: ServedRepository,
) -> None:
    http = th.InferenceServerClient(f"127.0.0.1:{served.module.http_port}",
                                    network_timeout=20.0)
    grpc = tg.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
    meta = http.get_model_metadata("pair")
    assert meta["inputs"] == [{"name": "a", "datatype": "FP32", "shape": [-1, -1]},
                              {"name": "b", "datatype": "INT64", "shape": [-1, -1]}]
    assert [o["name"] for o in meta["outputs"]] == ["sum", "norm"]
    before = served.billed()
    rng = np.random.default_rng(11)
    a = rng.normal(size=(3, 7)).astype(np.float32)
    b = rng.integers(-9, 9, size=(3, 7)).astype(np.int64)
    total, norm = expected(a, b)
    answers = 0
    for binary in (False, True):
        tensors = [th.InferInput("b", list(b.shape), "INT64"),
                   th.InferInput("a", list(a.shape), "FP32")]  # any order
        tensors[0].set_data_from_numpy(b, binary_data=binary)
        tensors[1].set_data_from_numpy(a, binary_data=binary)
        result = http.infer("pair", tensors, outputs=[
            th.InferRequestedOutput(n, binary_data=binary) for n in ("sum", "norm")])
        out_sum, out_norm = result.as_numpy("sum"), result.as_numpy("norm")
        assert out_sum is not None and out_norm is not None
        assert out_sum.dtype == np.float32 and np.allclose(out_sum, total, atol=1e-6)
        assert out_norm.shape == (3,) and np.allclose(out_norm, norm, rtol=1e-5)
        answers += 1
    grpc_tensors = [tg.InferInput("a", list(a.shape), "FP32"),
                    tg.InferInput("b", list(b.shape), "INT64")]
    grpc_tensors[0].set_data_from_numpy(a)
    grpc_tensors[1].set_data_from_numpy(b)
    result = grpc.infer("pair", grpc_tensors)
    assert np.allclose(result.as_numpy("sum"), total, atol=1e-6)
    assert np.allclose(result.as_numpy("norm"), norm, rtol=1e-5)
    answers += 1
    wait_until(lambda: served.billed() == before + answers, 20, f"{answers} records")

    def http_refusal(tensors: list[tuple[str, np.ndarray, str]]) -> InferenceServerException:
        inputs = []
        for name, value, datatype in tensors:
            tensor = th.InferInput(name, list(value.shape), datatype)
            tensor.set_data_from_numpy(value, binary_data=True)
            inputs.append(tensor)
        with pytest.raises(InferenceServerException) as refused:
            http.infer("pair", inputs)
        return refused.value

    wrong_name = http_refusal([("a", a, "FP32"), ("c", b, "INT64")])
    assert wrong_name.status() == "400" and "TensorNameMismatch" in str(wrong_name)
    wrong_dtype = http_refusal([("a", a, "FP32"), ("b", b.astype(np.float32), "FP32")])
    assert wrong_dtype.status() == "400" and "TensorDtypeInvalid" in str(wrong_dtype)
    mismatched = http_refusal([("a", a, "FP32"), ("b", b[:, :4].copy(), "INT64")])
    assert mismatched.status() == "400" and "TensorShapeMismatch" in str(mismatched)
    missing = tg.InferInput("a", list(a.shape), "FP32")
    missing.set_data_from_numpy(a)
    with pytest.raises(InferenceServerException) as grpc_refused:
        grpc.infer("pair", [missing])
    assert "TensorNameMismatch" in str(grpc_refused.value)
    time.sleep(1.0)
    assert served.billed() == before + answers
    grpc.close()


def test_a_real_text_detector_map_matches_onnxruntime(served: ServedRepository) -> None:
    image = dbnet_image()
    session = ort.InferenceSession(str(text_detector()), providers=["CPUExecutionProvider"])
    reference = session.run(None, {"x": image[None]})[0][0]  # [1, H, W]
    assert reference.shape == (1, 192, 384)
    text = reference > 0.3
    assert 0.05 < text.mean() < 0.5  # the page has lines of text, and space between
    before = served.billed()
    served.collector.publish("em/in/textdet", npy(image))
    wait_until(lambda: any(r["model"]["name"] == "textdet"
                           for r in served.collector.json(RESULTS)), 60, "the map")
    answer = next(r for r in served.collector.json(RESULTS) if r["model"]["name"] == "textdet")
    outputs = outputs_of(answer["results"][0])
    assert list(outputs) == ["sigmoid_0.tmp_0"]
    assert np.allclose(outputs["sigmoid_0.tmp_0"], reference, atol=1e-4)
    # over v2 as binary, the same map
    http = th.InferenceServerClient(f"127.0.0.1:{served.module.http_port}",
                                    network_timeout=60.0)
    tensor = th.InferInput("x", [1, *image.shape], "FP32")
    tensor.set_data_from_numpy(image[None], binary_data=True)
    result = http.infer("textdet", [tensor], outputs=[
        th.InferRequestedOutput("sigmoid_0.tmp_0", binary_data=True)])
    mapped = result.as_numpy("sigmoid_0.tmp_0")
    assert mapped is not None and np.allclose(mapped[0], reference, atol=1e-4)
    wait_until(lambda: served.billed() == before + 2, 20, "two records")
    assert {r["meter"]["name"] for r in served.billing.store.records()} >= {"textdet.tensor"}


def test_a_map_input_past_max_shape_is_refused_before_it_runs(served: ServedRepository) -> None:
    """The text detector takes at most ``[3, 1024, 1024]`` (``maxShape``): a ``[3, 1056,
    64]`` image, within every other limit, is refused by its declared shape over MQTT,
    v2 HTTP and gRPC, never run nor billed; the next image is answered."""
    tall = np.zeros((3, 1056, 64), np.float32)
    limit = "input x has size 1056 at dimension 1 of its item shape [3, 1056, 64]"
    before = served.billed()
    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = b"t-tall"
    served.collector.publish("em/in/textdet", npy(tall), properties=props)
    http = th.InferenceServerClient(f"127.0.0.1:{served.module.http_port}",
                                    network_timeout=20.0)
    tensor = th.InferInput("x", [1, *tall.shape], "FP32")
    tensor.set_data_from_numpy(tall[None], binary_data=True)
    with pytest.raises(InferenceServerException) as over_http:
        http.infer("textdet", [tensor])
    assert over_http.value.status() == "413" and "TensorTooLarge" in str(over_http.value)
    assert limit in str(over_http.value) and "maxShape [3, 1024, 1024]" in str(over_http.value)
    grpc = tg.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
    grpc_tensor = tg.InferInput("x", [1, *tall.shape], "FP32")
    grpc_tensor.set_data_from_numpy(tall[None])
    with pytest.raises(InferenceServerException) as over_grpc:
        grpc.infer("textdet", [grpc_tensor])
    assert "TensorTooLarge" in str(over_grpc.value) and limit in str(over_grpc.value)
    grpc.close()
    wait_until(lambda: "t-tall" in served.errors("t-"), 15, "the MQTT refusal")
    assert served.errors("t-") == {"t-tall": "TensorTooLarge"}
    refusal = next(e for e in served.collector.json(ERRORS) if e["id"] == "t-tall")
    assert limit in refusal["error"]["message"]
    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = b"t-small"
    served.collector.publish("em/in/textdet", npy(np.zeros((3, 64, 64), np.float32)),
                             properties=props)
    wait_until(lambda: len(served.results("t-small")) == 1, 30, "the next image answered")
    wait_until(lambda: served.billed() == before + 1, 20, "its record")
    time.sleep(0.5)  # a record for a refusal would have drained by now
    assert served.billed() == before + 1
