"""Detectors with NMS inside the graph, read by the detection head's ``layout: "nms"``.

The graph is built here, at test time, from the real YOLO11n (``bench/fetch.py``;
AGPL-3.0, so neither it nor this derivative is ever committed) by appending standard
ONNX ops after its raw output: best class per candidate, boxes to corners, class-aware
``NonMaxSuppression`` (IoU 0.45, score 0.25, at most 300), ``Gather`` and ``Pad`` to 300
rows. It answers in both layouts real exports use:

* ``detections`` ``[1, 300, 6]``: x1, y1, x2, y2, score, class in input pixels, padded
  with zero rows (Ultralytics' ``nms=True`` export);
* ``detection_boxes`` ``[1, 300, 4]`` (y1, x1, y2, x2 normalised to 0..1),
  ``detection_scores`` ``[1, 300]``, ``detection_classes`` ``[1, 300]`` (counted from 1)
  and ``num_detections`` ``[1]`` (TensorFlow's Object Detection API layout).

Checked on scikit-image's real photos: both layouts give the same detections as the
plain YOLO11n through the YOLO layout (same labels in the same order, boxes within 1
pixel, in the photo's pixels), the confidence threshold and the cap still apply, and
descriptors that do not fit the graph are refused at load with a clear message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import pytest
import skimage.data
from onnx import TensorProto, helper, numpy_helper

from bench.fetch import yolo11n
from edge_module.exceptions import ModelError
from edge_module.inference.codecs import Codec, Limits
from edge_module.inference.heads import Answering
from edge_module.inference.models import Model

PHOTOS = ("astronaut", "chelsea", "coffee")
CAP = 300


def _const(name: str, values: Any, dtype: Any = np.int64) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def nms_graph(source: Path, target: Path) -> None:
    """YOLO11n with class-aware NMS and padding appended after ``output0``."""
    model = onnx.load(source)
    assert model.opset_import[0].version == 17  # the ops below are written for opset 17
    graph = model.graph
    n = helper.make_node
    graph.initializer.extend([
        _const("ax0", [0]), _const("ax1", [1]), _const("zero", [0]), _const("four", [4]),
        _const("big", [10_000]), _const("two", [2]), _const("three", [3]),
        _const("cap", [CAP]), _const("max_out", [CAP]), _const("pads_head", [0, 0]),
        _const("pads_tail", [0]), _const("yxyx", [1, 0, 3, 2]),
        _const("iou", [0.45], np.float32), _const("score_min", [0.25], np.float32),
        _const("half", [0.5], np.float32), _const("class_gap", [4096.0], np.float32),
        _const("input_size", [640.0], np.float32), _const("one", [1.0], np.float32),
    ])
    graph.node.extend([
        n("Squeeze", ["output0", "ax0"], ["raw"]),  # [84, 8400]
        n("Slice", ["raw", "zero", "four", "ax0"], ["xywh"]),  # [4, 8400]
        n("Slice", ["raw", "four", "big", "ax0"], ["cls"]),  # [80, 8400]
        n("ReduceMax", ["cls"], ["score"], axes=[0], keepdims=0),  # [8400]
        n("ArgMax", ["cls"], ["class_id"], axis=0, keepdims=0),
        n("Cast", ["class_id"], ["class_f"], to=TensorProto.FLOAT),
        n("Split", ["xywh"], ["cx", "cy", "w", "h"], axis=0),  # opset 17: even split
        n("Mul", ["w", "half"], ["hw"]), n("Mul", ["h", "half"], ["hh"]),
        n("Sub", ["cx", "hw"], ["x1"]), n("Sub", ["cy", "hh"], ["y1"]),
        n("Add", ["cx", "hw"], ["x2"]), n("Add", ["cy", "hh"], ["y2"]),
        n("Concat", ["x1", "y1", "x2", "y2"], ["corners"], axis=0),
        n("Transpose", ["corners"], ["boxes"], perm=[1, 0]),  # [8400, 4]
        # class-aware: each class's boxes shifted apart so that they never overlap
        n("Mul", ["class_f", "class_gap"], ["shift"]),
        n("Unsqueeze", ["shift", "ax1"], ["shift_col"]),
        n("Add", ["boxes", "shift_col"], ["shifted"]),
        n("Unsqueeze", ["shifted", "ax0"], ["nms_boxes"]),  # [1, 8400, 4]
        n("Unsqueeze", ["score", "ax0"], ["score_row"]),
        n("Unsqueeze", ["score_row", "ax0"], ["nms_scores"]),  # [1, 1, 8400]
        n("NonMaxSuppression", ["nms_boxes", "nms_scores", "max_out", "iou", "score_min"],
          ["selected"]),  # [M, 3]: batch, class, box
        n("Slice", ["selected", "two", "three", "ax1"], ["picked_col"]),
        n("Squeeze", ["picked_col", "ax1"], ["picked"]),  # [M]
        n("Gather", ["boxes", "picked"], ["kept_boxes"], axis=0),
        n("Gather", ["score", "picked"], ["kept_scores"], axis=0),
        n("Gather", ["class_f", "picked"], ["kept_classes"], axis=0),
        n("Unsqueeze", ["kept_scores", "ax1"], ["score_col"]),
        n("Unsqueeze", ["kept_classes", "ax1"], ["class_col"]),
        n("Concat", ["kept_boxes", "score_col", "class_col"], ["rows"], axis=1),  # [M, 6]
        n("Shape", ["rows"], ["rows_shape"]),
        n("Slice", ["rows_shape", "zero", "ax1", "ax0"], ["m"]),
        n("Sub", ["cap", "m"], ["missing"]),
        n("Concat", ["pads_head", "missing", "pads_tail"], ["pads"], axis=0),
        n("Pad", ["rows", "pads"], ["padded"]),  # [300, 6], zero rows after the M kept
        n("Unsqueeze", ["padded", "ax0"], ["detections"]),
        # TensorFlow's layout: normalised y1, x1, y2, x2; classes from 1; a count
        n("Slice", ["padded", "zero", "four", "ax1"], ["pad_boxes"]),
        n("Gather", ["pad_boxes", "yxyx"], ["pad_yxyx"], axis=1),
        n("Div", ["pad_yxyx", "input_size"], ["pad_norm"]),
        n("Unsqueeze", ["pad_norm", "ax0"], ["detection_boxes"]),
        n("Slice", ["padded", "four", "big", "ax1"], ["pad_tail"]),  # [300, 2]
        n("Transpose", ["pad_tail"], ["tail_rows"], perm=[1, 0]),
        n("Split", ["tail_rows"], ["detection_scores", "class_zero"], axis=0),
        n("Add", ["class_zero", "one"], ["detection_classes"]),
        n("Cast", ["m"], ["num_detections"], to=TensorProto.FLOAT),
    ])
    del graph.output[:]
    graph.output.extend([
        helper.make_tensor_value_info("detections", TensorProto.FLOAT, [1, CAP, 6]),
        helper.make_tensor_value_info("detection_boxes", TensorProto.FLOAT, [1, CAP, 4]),
        helper.make_tensor_value_info("detection_scores", TensorProto.FLOAT, [1, CAP]),
        helper.make_tensor_value_info("detection_classes", TensorProto.FLOAT, [1, CAP]),
        helper.make_tensor_value_info("num_detections", TensorProto.FLOAT, [1]),
    ])
    onnx.checker.check_model(model)
    onnx.save(model, target)


def _with_descriptor(folder: Path, graph: Path, name: str, **changes: Any) -> Path:
    path = folder / f"{name}.onnx"
    path.symlink_to(graph)
    descriptor = json.loads(yolo11n().with_suffix(".json").read_text())
    descriptor.update({"maxBatch": 1, **changes})  # this graph handles one image per run
    path.with_suffix(".json").write_text(json.dumps(descriptor))
    return path


COMBINED: dict[str, Any] = {
    "headOptions": {"layout": "nms", "confidence": 0.25, "maxDetections": 100},
    "output": {"name": "detections"}}
SEPARATE: dict[str, Any] = {
    "headOptions": {"layout": "nms", "boxFormat": "yxyx", "normalized": True, "classOffset": 1,
                    "outputs": {"boxes": "detection_boxes", "scores": "detection_scores",
                                "classes": "detection_classes", "count": "num_detections"}},
    "output": None}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("nms")
    nms_graph(yolo11n(), folder / "graph.onnx")
    return folder


@pytest.fixture(scope="module")
def models(folder: Path) -> dict[str, Model]:
    return {"plain": Model(yolo11n()),
            "combined": Model(_with_descriptor(folder, folder / "graph.onnx", "combined",
                                               **COMBINED)),
            "separate": Model(_with_descriptor(folder, folder / "graph.onnx", "separate",
                                               **SEPARATE))}


def detect(model: Model, name: str) -> list[dict[str, Any]]:
    ok, data = cv2.imencode(".png", cv2.cvtColor(getattr(skimage.data, name)(),
                                                 cv2.COLOR_RGB2BGR))
    assert ok
    decoded = Codec(model, Limits(8 << 20, 8)).decode(data.tobytes())
    results = model.head.shape(model.run(np.stack(decoded.items)), decoded.frames,
                               Answering())
    found: list[dict[str, Any]] = results[0]["detections"]
    return found


def test_both_nms_layouts_answer_like_the_plain_detector_on_real_photos(
        models: dict[str, Model]) -> None:
    for photo in PHOTOS:
        plain = detect(models["plain"], photo)
        assert plain, photo
        for layout in ("combined", "separate"):
            theirs = detect(models[layout], photo)
            assert [d["label"] for d in theirs] == [d["label"] for d in plain], (photo, layout)
            for mine, reference in zip(theirs, plain, strict=True):
                assert abs(mine["score"] - reference["score"]) < 1e-4
                for key in ("x1", "y1", "x2", "y2"):
                    assert abs(mine["box"][key] - reference["box"][key]) <= 1.0, \
                        (photo, layout, key)
    # boxes are in the photo's pixels (512x512 astronaut), not the model's 640x640
    person = detect(models["separate"], "astronaut")[0]
    assert person["label"] == "person" and person["box"]["x2"] <= 512


def test_the_confidence_threshold_and_the_cap_still_apply(folder: Path) -> None:
    strict = Model(_with_descriptor(folder, folder / "graph.onnx", "strict", headOptions={
        **COMBINED["headOptions"], "confidence": 0.6, "maxDetections": 1}, output={
        "name": "detections"}))
    loose = detect(Model(_with_descriptor(folder, folder / "graph.onnx", "loose",
                                          **COMBINED)), "coffee")
    found = detect(strict, "coffee")
    above = [d for d in loose if d["score"] >= 0.6]
    assert len(loose) > len(above) > 1  # the photo tests both limits
    assert found == above[:1]


def test_descriptors_that_do_not_fit_the_graph_are_refused_at_load(folder: Path) -> None:
    cases: list[tuple[str, Path, dict[str, Any], str]] = [
        ("raw", yolo11n(), COMBINED | {"output": {"name": "output0"}},
         "output 'output0' has shape [1, 84, 8400] for one item; layout nms reads [1, K, 6]"),
        ("wrongrole", folder / "graph.onnx", {"headOptions": {
            "layout": "nms", "outputs": {"boxes": "detection_scores",
                                         "scores": "detection_boxes",
                                         "classes": "detection_classes"}}, "output": None},
         "boxes output 'detection_scores' has shape [1, 300] for one item; layout nms needs "
         "[1, K, 4]"),
        ("missing", folder / "graph.onnx", {"headOptions": {
            "layout": "nms", "outputs": {"boxes": "detection_boxes", "scores": "nope",
                                         "classes": "detection_classes"}}, "output": None},
         "headOptions.outputs names nope, not in the graph"),
        ("iou", folder / "graph.onnx", {"headOptions": {"layout": "nms", "iou": 0.5},
                                        "output": {"name": "detections"}},
         "headOptions iou do not apply to layout nms"),
        ("yolo", yolo11n(), {"headOptions": {"layout": "yolov8", "normalized": True}},
         "headOptions normalized apply to layout nms only"),
    ]
    for name, graph, changes, message in cases:
        with pytest.raises(ModelError, match="the detection head cannot serve it") as refused:
            Model(_with_descriptor(folder, graph, name, **changes))
        assert message in str(refused.value), str(refused.value)
