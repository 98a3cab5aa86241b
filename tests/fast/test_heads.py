"""The output heads' rules, in process: load checks, NMS, letterbox frames, normalisation.

Real models where a graph matters (the built-in digits and telemetry models, and a
two-class graph built here with onnx); pure numpy for the post-processing rules.
The trained detector on real photos is tested in tests/test_detection.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edge_module.config import BUILTIN_MODELS
from edge_module.exceptions import ModelError
from edge_module.inference.codecs import fit, preprocess
from edge_module.inference.descriptor import Descriptor, ImageInput
from edge_module.inference.heads import Answering, Frame, HeadMismatch, build_head
from edge_module.inference.heads.detection import DetectionHead, class_aware_nms, nms
from edge_module.inference.heads.tensor import TensorHead
from edge_module.inference.models import Model

COCO3 = ["person", "cat", "cup"]


def _copy_builtin(tmp_path: Path, name: str, **changes: Any) -> Path:
    shutil.copy(BUILTIN_MODELS / f"{name}.onnx", tmp_path / f"{name}.onnx")
    descriptor = json.loads((BUILTIN_MODELS / f"{name}.json").read_text())
    descriptor.update(changes)
    (tmp_path / f"{name}.json").write_text(json.dumps(descriptor))
    return tmp_path / f"{name}.onnx"


def _two_class_model(tmp_path: Path, labels: list[str]) -> Path:
    """A real ONNX graph: 4 features -> MatMul -> Softmax over 2 classes."""
    weights = helper.make_tensor("w", TensorProto.FLOAT, [4, 2], [1, -1] * 4)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["z"]),
         helper.make_node("Softmax", ["z"], ["p"], axis=1)],
        "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["n", 2])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "two.onnx")
    (tmp_path / "two.json").write_text(json.dumps({
        "name": "two", "version": "1", "input": {"name": "x", "kind": "tensor", "shape": [4]},
        "output": {"name": "p"}, "labels": labels,
        "metering": {"meterName": "two", "apiType": "t"}}))
    return tmp_path / "two.onnx"


def _descriptor(**fields: Any) -> Descriptor:
    base: dict[str, Any] = {
        "name": "d", "version": "1", "labels": COCO3, "head": "detection",
        "input": {"name": "images", "kind": "image", "width": 64, "height": 64,
                  "channels": 3, "resize": "letterbox"},
        "metering": {"meterName": "m", "apiType": "a"}}
    base.update(fields)
    return Descriptor.model_validate(base)


# -- load checks -------------------------------------------------------------

def test_three_labels_on_a_two_class_model_are_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as refused:
        Model(_two_class_model(tmp_path, ["0", "90", "180"]))
    text = str(refused.value)
    assert "scores 2 classes but the descriptor has 3 labels" in text
    assert "x ['n', 4] tensor(float)" in text and "p [1, 2]" in text  # inputs, outputs
    assert "heads that could serve it as described: tensor" in text
    Model(_two_class_model(tmp_path, ["0", "180"]))  # the right labels load


def test_five_labels_on_the_ten_digit_model_are_refused_at_load(tmp_path: Path) -> None:
    labels = [str(i) for i in range(5)]
    with pytest.raises(ModelError, match="scores 10 classes but the descriptor has 5 labels"):
        Model(_copy_builtin(tmp_path, "digits", labels=labels))


def test_an_unknown_head_is_refused_naming_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="unknown head 'segmentation'; known heads: "
                       "centerface, classification, detection, tensor"):
        Model(_copy_builtin(tmp_path, "digits", head="segmentation"))


def test_inputs_are_checked_by_name_and_rank(tmp_path: Path) -> None:
    digits = json.loads((BUILTIN_MODELS / "digits.json").read_text())
    wrong_name = dict(digits["input"], name="pixels")
    with pytest.raises(ModelError, match="the descriptor's input 'pixels' is not one of them"):
        Model(_copy_builtin(tmp_path, "digits", input=wrong_name))
    as_tensor = {"name": "image", "kind": "tensor", "shape": [64]}
    with pytest.raises(ModelError, match=r"the input needs rank 2 \(batch first\), not 4"):
        Model(_copy_builtin(tmp_path, "digits", input=as_tensor))


def test_mean_and_std_take_one_value_for_all_channels_or_one_per_channel() -> None:
    spec = {"name": "x", "kind": "image", "width": 4, "height": 4, "channels": 3}
    for bad in ({"mean": [0.5, 0.5]}, {"std": [1.0, 1.0, 1.0, 1.0]}, {"std": [0.0]}):
        with pytest.raises(ValueError):
            ImageInput.model_validate({**spec, **bad})
    one = ImageInput.model_validate({**spec, "mean": [0.5], "std": [0.25]})
    white = np.full((4, 4, 3), 255, dtype=np.uint8)
    blob, _ = preprocess(white, one)
    # (1.0 - 0.5) / 0.25 on EVERY channel: a single mean used to reach the first one only
    assert blob.shape == (3, 4, 4) and np.allclose(blob, 2.0)
    each = ImageInput.model_validate({**spec, "mean": [0.1, 0.2, 0.3], "std": [1, 2, 4]})
    blob, _ = preprocess(white, each)
    assert np.allclose(blob[:, 0, 0], [0.9, 0.4, 0.175])


def test_the_tensor_head_returns_named_tensors_and_refuses_too_large_outputs(
        tmp_path: Path) -> None:
    model = Model(_copy_builtin(tmp_path, "telemetry", head="tensor"))
    assert isinstance(model.head, TensorHead)
    rows = np.random.default_rng(3).normal(size=(2, 8)).astype(np.float32)
    outputs = model.run(rows)
    results = model.head.shape(outputs, [None, None], Answering())
    direct = model.session.run(None, {model.descriptor.input.name: rows})
    names = [o.name for o in model.session.get_outputs()]
    assert len(results) == 2
    for i, result in enumerate(results):
        got = {t["name"]: t for t in result["outputs"]}
        assert list(got) == names
        for name, value in zip(names, direct, strict=True):
            assert got[name]["shape"] == list(np.asarray(value[i]).shape)
            assert got[name]["dtype"] == str(np.asarray(value).dtype)
            assert np.allclose(np.asarray(got[name]["data"]), value[i])
    json.dumps(results)  # plain JSON
    with pytest.raises(ModelError, match=r"headOptions\.maxElements is 1"):
        Model(_copy_builtin(tmp_path, "telemetry", head="tensor",
                            headOptions={"maxElements": 1}))


def test_the_tensor_head_sends_non_finite_values_as_null() -> None:
    head = TensorHead(("y",))
    (result,) = head.shape({"y": np.array([[1.0, np.nan, np.inf]])}, [None], Answering())
    assert result["outputs"][0]["data"] == [1.0, None, None]


# -- detection: layouts, NMS, frames -----------------------------------------

def test_the_detection_head_tells_the_yolo_layouts_apart_by_the_labels_count() -> None:
    assert build_head(_descriptor(), {"out": (1, 7, 100)}).layout == "yolov8"  # type: ignore[attr-defined]
    assert build_head(_descriptor(), {"out": (1, 100, 8)}).layout == "yolov5"  # type: ignore[attr-defined]
    with pytest.raises(HeadMismatch, match="fits 3 labels in neither YOLO layout"):
        build_head(_descriptor(), {"out": (1, 84, 8400)})  # 80 classes, 3 labels
    with pytest.raises(HeadMismatch, match=r"fits both YOLO layouts: set headOptions\.layout"):
        build_head(_descriptor(), {"out": (1, 7, 8)})
    forced = _descriptor(headOptions={"layout": "yolov5"})
    assert build_head(forced, {"out": (1, 7, 8)}).layout == "yolov5"  # type: ignore[attr-defined]
    with pytest.raises(HeadMismatch, match=r"headOptions\.iou"):
        build_head(_descriptor(headOptions={"iou": 2}), {"out": (1, 7, 100)})
    tensor_input = _descriptor(input={"name": "x", "kind": "tensor", "shape": [4]})
    with pytest.raises(HeadMismatch, match="needs an image input"):
        build_head(tensor_input, {"out": (1, 7, 100)})


def test_nms_keeps_the_best_of_overlapping_boxes_per_class() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]],
                     dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], dtype=np.float32)
    classes = np.array([0, 0, 1, 0])
    assert nms(boxes, scores, 0.45, 100).tolist() == [0, 3]  # class-agnostic
    assert class_aware_nms(boxes, scores, classes, 0.45, 100).tolist() == [0, 2, 3]
    assert class_aware_nms(boxes, scores, classes, 0.45, 2).tolist() == [0, 2]  # the cap
    # IoU 0.68 stays under 0.99; only the identical box (IoU 1) goes
    assert nms(boxes, scores, 0.99, 100).tolist() == [0, 1, 3]
    empty = np.zeros((0, 4), dtype=np.float32)
    assert class_aware_nms(empty, np.zeros(0), np.zeros(0), 0.45, 10).tolist() == []


def _prediction(layout: str, rows: list[tuple[float, float, float, float, int, float]],
                classes: int = 3, anchors: int = 20) -> np.ndarray:
    """A YOLO output for one item: (cx, cy, w, h, class, score) per candidate."""
    width = (4 if layout == "yolov8" else 5) + classes
    out = np.zeros((anchors, width), dtype=np.float32)
    for i, (cx, cy, w, h, cls, score) in enumerate(rows):
        out[i, :4] = (cx, cy, w, h)
        if layout == "yolov8":
            out[i, 4 + cls] = score
        else:
            out[i, 4], out[i, 5 + cls] = 1.0, score
    return out.T if layout == "yolov8" else out


@pytest.mark.parametrize("layout", ["yolov8", "yolov5"])
def test_detections_are_mapped_back_to_the_original_image_and_clipped(layout: str) -> None:
    shape = (1, 7, 20) if layout == "yolov8" else (1, 20, 8)
    head = build_head(_descriptor(headOptions={"layout": layout}), {"out": shape})
    assert isinstance(head, DetectionHead)
    # a 128x64 photo letterboxed into 64x64: scale 0.5, 16 rows of padding above
    frame = Frame(128, 64, 0.5, 0.5, 0, 16)
    rows = [(32, 32, 20, 10, 1, 0.9),   # a cat in the middle
            (33, 32, 20, 10, 1, 0.8),   # the same cat again: suppressed
            (60, 20, 20, 10, 2, 0.7),   # a cup over the right edge: clipped
            (10, 10, 4, 4, 0, 0.1)]     # below the confidence threshold
    (result,) = head.shape({"out": _prediction(layout, rows)[None]}, [frame], Answering())
    found = result["detections"]
    assert [d["label"] for d in found] == ["cat", "cup"]
    assert found[0]["box"] == {"x1": 44.0, "y1": 22.0, "x2": 84.0, "y2": 42.0}
    assert found[0]["score"] == pytest.approx(0.9)
    assert found[1]["box"] == {"x1": 100.0, "y1": 0.0, "x2": 128.0, "y2": 18.0}


def test_an_item_sent_as_a_tensor_gets_boxes_in_the_model_input_pixels() -> None:
    head = build_head(_descriptor(), {"out": (1, 7, 20)})
    rows = [(60, 32, 20, 10, 1, 0.9)]
    (result,) = head.shape({"out": _prediction("yolov8", rows)[None]}, [None], Answering())
    assert result["detections"][0]["box"] == {"x1": 50.0, "y1": 27.0, "x2": 64.0, "y2": 37.0}


def test_nms_in_the_graph_rows_are_thresholded_capped_and_mapped_back() -> None:
    head = build_head(_descriptor(headOptions={"layout": "nms", "maxDetections": 2}),
                      {"out": (1, 5, 6)})
    assert isinstance(head, DetectionHead) and head.outputs == ("out",)
    rows = np.array([[[0, 16, 20, 26, 0.5, 1],   # a cat, second best
                      [40, 20, 80, 30, 0.9, 2],  # a cup over the right edge
                      [0, 16, 4, 20, 0.3, 0],    # third: past the cap
                      [0, 0, 0, 0, 0.0, 0],      # padding
                      [1, 1, 2, 2, 0.1, 7]]], dtype=np.float32)  # under the threshold
    frame = Frame(128, 64, 0.5, 0.5, 0, 16)
    (result,) = head.shape({"out": rows}, [frame], Answering())
    assert result["detections"] == [
        {"label": "cup", "score": 0.9, "box": {"x1": 80.0, "y1": 8.0, "x2": 128.0, "y2": 28.0}},
        {"label": "cat", "score": 0.5, "box": {"x1": 0.0, "y1": 0.0, "x2": 40.0, "y2": 20.0}}]


def test_separate_nms_outputs_read_count_format_offset_and_unknown_classes() -> None:
    options = {"layout": "nms", "boxFormat": "yxyx", "normalized": True, "classOffset": 1,
               "outputs": {"boxes": "b", "scores": "s", "classes": "c", "count": "n"}}
    shapes = {"b": (1, 3, 4), "s": (1, 3), "c": (1, 3), "n": (1,)}
    head = build_head(_descriptor(headOptions=options), shapes)
    outputs = {"b": np.array([[[0.25, 0.5, 0.5, 1.0], [0, 0, 0.5, 0.5], [0, 0, 1, 1]]]),
               "s": np.array([[0.8, 0.7, 0.9]]), "c": np.array([[2, 9, 1]]),
               "n": np.array([2.0])}  # the third row is past the count
    (result,) = head.shape(outputs, [None], Answering())
    assert result["detections"] == [
        {"label": "cat", "score": 0.8, "box": {"x1": 32.0, "y1": 16.0, "x2": 64.0, "y2": 32.0}},
        {"label": None, "score": 0.7, "box": {"x1": 0.0, "y1": 0.0, "x2": 32.0, "y2": 32.0}}]
    with pytest.raises(HeadMismatch, match=r"scores output 's' has shape \[1, 4\]"):
        build_head(_descriptor(headOptions=options), {**shapes, "s": (1, 4)})
    with pytest.raises(HeadMismatch, match=r"count output 'n' has shape \[1, 2\]"):
        build_head(_descriptor(headOptions=options), {**shapes, "n": (1, 2)})
    with pytest.raises(HeadMismatch, match="layout nms reads"):
        build_head(_descriptor(headOptions={"layout": "nms"}), {"out": (1, 7, 100)})


def test_letterbox_keeps_the_aspect_ratio_and_centres_the_image() -> None:
    spec = ImageInput.model_validate({"name": "x", "kind": "image", "width": 64,
                                      "height": 64, "channels": 3, "resize": "letterbox",
                                      "interpolation": "linear"})
    photo = np.full((50, 100, 3), 200, dtype=np.uint8)
    fitted, frame = fit(photo, spec)
    assert fitted.shape == (64, 64, 3)
    assert frame == Frame(100, 50, 0.64, 0.64, 0, 16)
    assert (fitted[:16] == 114).all() and (fitted[48:] == 114).all()  # padding
    assert (fitted[16:48] == 200).all()
    # a point of the photo lands where the frame says, and maps back
    marked = photo.copy()
    marked[20:30, 40:60] = 0
    dark = np.argwhere(fit(marked, spec)[0][:, :, 0] < 100)
    (_, x0), (y1, _) = dark.min(axis=0), dark.max(axis=0)
    assert abs((x0 - frame.pad_x) / frame.scale_x - 40) <= 2
    assert abs((y1 + 1 - frame.pad_y) / frame.scale_y - 30) <= 2
    stretch = spec.model_copy(update={"resize": "stretch"})
    fitted, frame = fit(photo, stretch)
    assert fitted.shape == (64, 64, 3) and frame == Frame(100, 50, 0.64, 1.28)
    grey = spec.model_copy(update={"channels": 1})
    fitted, _ = fit(cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY), grey)
    assert fitted.shape == (64, 64)
