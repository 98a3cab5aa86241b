"""Codecs and models without a broker: decoding, error codes, provenance, accuracy."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from edge_module.config import BUILTIN_MODELS, ModelSettings
from edge_module.envelope import result_envelope
from edge_module.errors import ErrorCode
from edge_module.exceptions import ModelError
from edge_module.inference.codecs import Codec, Limits, RequestError
from edge_module.inference.heads.classification import shape_results
from edge_module.inference.models import Model, load_model
from simulator.datasets import digits_split
from tests.support import digit_png
from tools.train_models import main as train_main


@pytest.fixture(scope="module")
def digits() -> Model:
    return load_model(ModelSettings())


@pytest.fixture(scope="module")
def codec(digits: Model) -> Codec:
    return Codec(digits, Limits(max_payload_bytes=1 << 20, max_batch_items=8))


def test_provenance_is_the_sha256_of_the_file(digits: Model) -> None:
    data = (BUILTIN_MODELS / "digits.onnx").read_bytes()
    assert digits.provenance.sha256 == hashlib.sha256(data).hexdigest()
    assert digits.provenance.name == "digits" and digits.provenance.version == "1.0.0"


def test_held_out_accuracy_through_the_image_codec(digits: Model, codec: Codec) -> None:
    _, x_test, _, y_test = digits_split()
    batch = np.stack([codec.decode(digit_png(x)).items[0] for x in x_test])
    accuracy = float((digits.run(batch)["probabilities"].argmax(axis=1) == y_test).mean())
    assert accuracy >= 0.97


def test_all_payload_forms_decode_to_the_same_item(codec: Codec) -> None:
    _, x_test, _, _ = digits_split()
    png = digit_png(x_test[0])
    raw = codec.decode(png).items[0]
    as_json = codec.decode(json.dumps({"id": "a", "image": base64.b64encode(png).decode()})
                           .encode())
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    as_url = codec.decode(json.dumps({"image": data_url}).encode())
    buffer = io.BytesIO()
    np.save(buffer, raw)
    as_npy = codec.decode(buffer.getvalue())
    as_tensor = codec.decode(json.dumps({"id": 7, "tensor": raw.tolist()}).encode())
    for decoded in (as_json, as_url, as_npy, as_tensor):
        np.testing.assert_allclose(decoded.items[0], raw, atol=1e-6)
    assert as_json.request_id == "a" and as_tensor.request_id == "7"
    assert raw.shape == (1, 8, 8) and raw.dtype == np.float32


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"", ErrorCode.EMPTY_PAYLOAD),
        (b"GIF89a....", ErrorCode.UNSUPPORTED_PAYLOAD),
        (b"{oops", ErrorCode.INVALID_JSON),
        (b"{\"id\": \"x\", \"tensor\": [1], \"extra\": 1}", ErrorCode.UNKNOWN_FIELD),
        (b"{\"id\": \"x\", \"tensor\": [1], \"image\": \"\"}", ErrorCode.INVALID_REQUEST),
        (b"{\"id\": [1], \"tensor\": [1]}", ErrorCode.INVALID_REQUEST),
        (b"{\"image\": 5}", ErrorCode.INVALID_BASE64),
        (b"{\"tensor\": [[1, 2], [3]]}", ErrorCode.TENSOR_SHAPE_MISMATCH),
        (b"{\"tensor\": [true]}", ErrorCode.TENSOR_DTYPE_INVALID),
        (b"{\"tensor\": " + json.dumps(np.full((1, 8, 8), np.nan).tolist()).encode() + b"}",
         ErrorCode.TENSOR_VALUE_INVALID),
        (b"{\"items\": " + json.dumps([{"tensor": [0]}] * 9).encode() + b"}",
         ErrorCode.BATCH_TOO_LARGE),
        (b"{\"items\": [{\"tensor\": [0], \"id\": 1}]}", ErrorCode.UNKNOWN_FIELD),
        (b"\x93NUMPY garbage", ErrorCode.UNSUPPORTED_PAYLOAD),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, ErrorCode.IMAGE_DECODE_FAILED),
    ],
)
def test_malformed_payloads_get_stable_codes(codec: Codec, payload: bytes,
                                             code: ErrorCode) -> None:
    with pytest.raises(RequestError) as info:
        codec.decode(payload)
    assert info.value.code == code.value
    assert info.value.message


def test_request_id_survives_into_the_error(codec: Codec) -> None:
    with pytest.raises(RequestError) as info:
        codec.decode(b'{"id": "abc", "tensor": [1, 2]}')
    assert info.value.request_id == "abc"


def test_object_npy_is_refused_without_unpickling(codec: Codec) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(RequestError) as info:
        codec.decode(buffer.getvalue())
    assert info.value.code == ErrorCode.TENSOR_DTYPE_INVALID.value


def test_images_sent_to_a_tensor_model_are_refused() -> None:
    model = load_model(ModelSettings(Name="telemetry"))
    codec = Codec(model, Limits(1 << 20, 8))
    _, x_test, _, _ = digits_split()
    with pytest.raises(RequestError) as info:
        codec.decode(digit_png(x_test[0]))
    assert info.value.code == ErrorCode.INPUT_KIND_MISMATCH.value


def test_result_envelope_shape(digits: Model) -> None:
    scores = np.array([[0.1, 0.7, 0.2] + [0.0] * 7], dtype=np.float32)
    results = shape_results(scores, digits.labels, 2)
    body = json.loads(result_envelope("r1", digits.provenance, results,
                                      {"decode": 1.0, "infer": 2.0, "total": 3.5}))
    assert body["id"] == "r1"
    assert body["results"] == [{"label": "1", "score": pytest.approx(0.7),
                                "topK": [{"label": "1", "score": pytest.approx(0.7)},
                                         {"label": "2", "score": pytest.approx(0.2)}]}]
    assert body["timingMs"] == {"decode": 1.0, "infer": 2.0, "total": 3.5}


def test_descriptor_that_does_not_match_the_graph_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes((BUILTIN_MODELS / "digits.onnx").read_bytes())
    descriptor = json.loads((BUILTIN_MODELS / "digits.json").read_text())
    descriptor["input"]["width"] = 16
    (tmp_path / "m.json").write_text(json.dumps(descriptor))
    with pytest.raises(ModelError, match="does not match"):
        Model(tmp_path / "m.onnx")


def test_corrupt_model_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"not a model")
    (tmp_path / "m.json").write_text((BUILTIN_MODELS / "digits.json").read_text())
    with pytest.raises(ModelError, match="onnxruntime cannot load"):
        Model(tmp_path / "m.onnx")


def test_training_is_reproducible_byte_for_byte(tmp_path: Path, monkeypatch:
                                                 pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["train_models", "--out", str(tmp_path)])
    train_main()
    for name in ("digits", "telemetry"):
        assert (tmp_path / f"{name}.onnx").read_bytes() == \
            (BUILTIN_MODELS / f"{name}.onnx").read_bytes(), f"{name}.onnx differs"
        assert (tmp_path / f"{name}.json").read_text() == \
            (BUILTIN_MODELS / f"{name}.json").read_text()
