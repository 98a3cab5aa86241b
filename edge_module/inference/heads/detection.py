"""The ``detection`` head: YOLO-family outputs -> boxes in the original image's pixels.

Layouts: YOLOv5 ``[1, N, 5 + C]`` (cx, cy, w, h, objectness, C class scores) and
YOLOv8 / YOLO11 ``[1, 4 + C, N]`` (cx, cy, w, h, C class scores), told apart by
the labels count at load (``headOptions.layout`` forces one). Per item: the
best class of each candidate, a confidence threshold, class-aware NMS (numpy,
one vectorised IoU pass per kept box), a cap on detections, then each box
mapped back through the codec's resize (letterbox or stretch, ``Frame``) and
clipped to the image (an item sent as a tensor is already in the model's
pixels, so its boxes stay in them). One answer per image, billed per image,
not per box.

``layout: "nms"`` reads graphs that do their NMS themselves: one output
``[1, K, 6]`` (x1, y1, x2, y2, score, class: Ultralytics' ``nms=True`` export),
or separate boxes ``[1, K, 4]``, scores ``[1, K]`` and classes ``[1, K]`` outputs
(and optionally a detection count ``[1]``, TensorFlow's Object Detection API
layout) named in ``headOptions.outputs``; rows padded with low scores are
dropped by the confidence threshold, the cap still applies, and boxes are mapped
back the same way (``boxFormat`` and ``normalized`` say how the graph writes them).
Runs on the pipeline's commit thread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edge_module.inference.descriptor import Descriptor, ImageInput
from edge_module.inference.heads.base import (
    Answering,
    Frame,
    HeadMismatch,
    Shapes,
    one_output,
    options,
)

Layout = Literal["yolov5", "yolov8", "nms"]


class NmsOutputs(BaseModel):
    """The graph outputs of a detector with NMS inside, when they are separate tensors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    boxes: str
    scores: str
    classes: str
    count: str | None = None  # the number of valid rows per item (e.g. num_detections)


class DetectionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    layout: Literal["auto", "yolov5", "yolov8", "nms"] = "auto"
    confidence: float = Field(0.25, gt=0, le=1)
    iou: float = Field(0.45, gt=0, le=1)
    maxDetections: int = Field(100, ge=1, le=1000)
    # Most candidates (best scores first) that enter NMS, which costs O(kept x candidates).
    maxCandidates: int = Field(30_000, ge=1)
    classAgnostic: bool = False
    # layout "nms" only: separate outputs (else one [1, K, 6] output), how boxes are
    # written, and the id of the first label (TensorFlow's detectors count from 1).
    outputs: NmsOutputs | None = None
    boxFormat: Literal["xyxy", "yxyx"] = "xyxy"
    normalized: bool = False
    classOffset: int = 0


YOLO_ONLY = ("iou", "maxCandidates", "classAgnostic")
NMS_ONLY = ("outputs", "boxFormat", "normalized", "classOffset")


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, limit: int) -> np.ndarray:
    """Indices of the boxes kept by greedy non-maximum suppression, best score first.

    ``boxes`` are ``[M, 4]`` x1, y1, x2, y2; a box is dropped when its IoU with a
    better kept box is above ``iou``. At most ``limit`` indices are returned.
    """
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    keep: list[int] = []
    while order.size and len(keep) < limit:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        w = np.clip(np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]), 0, None)
        inter = w * h
        union = areas[best] + areas[rest] - inter
        overlap = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[overlap <= iou]
    return np.asarray(keep, dtype=np.intp)


def class_aware_nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float,
                    limit: int) -> np.ndarray:
    """NMS within each class only: boxes are shifted apart by class so they never overlap."""
    if boxes.size == 0:
        return np.zeros(0, dtype=np.intp)
    offset = float(np.abs(boxes).max()) + 1.0
    return nms(boxes + (classes.astype(np.float32) * offset)[:, None], scores, iou, limit)


def decode_yolo(prediction: np.ndarray, layout: Literal["yolov5", "yolov8"],
                confidence: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes (x1, y1, x2, y2 in input pixels), scores and classes of one item's candidates
    at or above ``confidence``."""
    rows = prediction.T if layout == "yolov8" else prediction
    class_scores = rows[:, 4:] if layout == "yolov8" else rows[:, 5:] * rows[:, 4:5]
    classes = class_scores.argmax(axis=1)
    scores = class_scores[np.arange(len(rows)), classes]
    kept = scores >= confidence
    cx, cy, w, h = (rows[kept, i] for i in range(4))
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    return boxes.astype(np.float32), scores[kept].astype(np.float32), classes[kept]


def to_original(boxes: np.ndarray, frame: Frame) -> np.ndarray:
    """Boxes in the model's input pixels -> the original image's, clipped to it."""
    out = boxes.astype(np.float64).copy()
    out[:, [0, 2]] = (out[:, [0, 2]] - frame.pad_x) / frame.scale_x
    out[:, [1, 3]] = (out[:, [1, 3]] - frame.pad_y) / frame.scale_y
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, frame.width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, frame.height)
    return out


def nms_outputs(opts: DetectionOptions, descriptor: Descriptor,
                shapes: Shapes) -> tuple[str, ...]:
    """The outputs a graph with NMS inside is read from, checked against their shapes:
    one ``[1, K, 6]`` output, or boxes ``[1, K, 4]``, scores and classes ``[1, K]``
    (and a count ``[1]`` or ``[1, 1]``)."""
    if opts.outputs is None:
        output = one_output(descriptor, shapes)
        shape = shapes[output]
        if len(shape) != 3 or shape[0] != 1 or shape[2] != 6:
            raise HeadMismatch(
                f"output {output!r} has shape {list(shape)} for one item; layout nms reads "
                "[1, K, 6] (x1, y1, x2, y2, score, class), or name separate boxes, scores and "
                "classes outputs in headOptions.outputs")
        return (output,)
    named = opts.outputs
    names = [named.boxes, named.scores, named.classes] + ([named.count] if named.count else [])
    missing = [n for n in names if n not in shapes]
    if missing:
        raise HeadMismatch(f"headOptions.outputs names {', '.join(missing)}, not in the graph "
                           f"(outputs: {', '.join(shapes)})")
    boxes, scores, classes = shapes[named.boxes], shapes[named.scores], shapes[named.classes]
    if len(boxes) != 3 or boxes[0] != 1 or boxes[2] != 4:
        raise HeadMismatch(f"boxes output {named.boxes!r} has shape {list(boxes)} for one "
                           "item; layout nms needs [1, K, 4]")
    for role, name, shape in (("scores", named.scores, scores),
                              ("classes", named.classes, classes)):
        if list(shape) != [1, boxes[1]]:
            raise HeadMismatch(f"{role} output {name!r} has shape {list(shape)} for one item; "
                               f"with boxes {list(boxes)} it must be [1, {boxes[1]}]")
    if named.count and list(shapes[named.count]) not in ([1], [1, 1]):
        raise HeadMismatch(f"count output {named.count!r} has shape "
                           f"{list(shapes[named.count])} for one item; it must be [1] or [1, 1]")
    return tuple(names)


def yolo_layout(opts: DetectionOptions, output: str, shape: tuple[int, ...],
                count: int) -> Literal["yolov5", "yolov8"]:
    """The YOLO layout a raw output of ``shape`` has for ``count`` labels."""
    if len(shape) != 3 or shape[0] != 1:
        raise HeadMismatch(f"output {output!r} has shape {list(shape)} for one item; a "
                           "YOLO detector answers [1, 4+C, N] or [1, N, 5+C] (a graph with "
                           "NMS inside: layout nms)")
    fits: list[Literal["yolov5", "yolov8"]] = []
    if shape[1] == 4 + count:
        fits.append("yolov8")
    if shape[2] == 5 + count:
        fits.append("yolov5")
    if opts.layout in ("yolov5", "yolov8"):
        if opts.layout not in fits:
            raise HeadMismatch(
                f"output {output!r} has shape {list(shape)}; layout {opts.layout} with "
                f"{count} labels needs " + (f"[1, {4 + count}, N]" if opts.layout ==
                                            "yolov8" else f"[1, N, {5 + count}]"))
        return opts.layout
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise HeadMismatch(
            f"output {output!r} has shape {list(shape)}, which fits {count} labels in "
            f"neither YOLO layout: YOLOv8/11 [1, {4 + count}, N] or YOLOv5 "
            f"[1, N, {5 + count}]; check the labels (one per class), or set layout nms for "
            "a graph with NMS inside")
    raise HeadMismatch(f"output {output!r} has shape {list(shape)}, which fits both "
                       "YOLO layouts: set headOptions.layout")


class DetectionHead:
    name = "detection"

    def __init__(self, outputs: tuple[str, ...], labels: list[str], layout: Layout,
                 opts: DetectionOptions, input_size: tuple[int, int] = (0, 0)) -> None:
        self.outputs = outputs
        # An item sent as a tensor is already in the model's pixels: its boxes stay there.
        self.tensor_frame = Frame(*input_size)
        self.input_size = input_size
        self.labels = labels
        self.layout = layout
        self.options = opts

    @classmethod
    def build(cls, descriptor: Descriptor, shapes: Shapes) -> DetectionHead:
        opts = options(DetectionOptions, descriptor)
        if not isinstance(descriptor.input, ImageInput):
            raise HeadMismatch("the detection head needs an image input (boxes are given "
                               "in the image's pixels)")
        count = len(descriptor.labels)
        if count == 0:
            raise HeadMismatch("the descriptor has no labels; a detector needs one per class")
        size = (descriptor.input.width, descriptor.input.height)
        if opts.layout == "nms":
            misplaced = sorted(set(YOLO_ONLY) & opts.model_fields_set)
            if misplaced:
                raise HeadMismatch(f"headOptions {', '.join(misplaced)} do not apply to layout "
                                   "nms: the graph does its own NMS")
            return cls(nms_outputs(opts, descriptor, shapes), descriptor.labels, "nms", opts,
                       size)
        misplaced = sorted(set(NMS_ONLY) & opts.model_fields_set)
        if misplaced:
            raise HeadMismatch(f"headOptions {', '.join(misplaced)} apply to layout nms only")
        output = one_output(descriptor, shapes)
        layout = yolo_layout(opts, output, shapes[output], count)
        return cls((output,), descriptor.labels, layout, opts, size)

    def shape(self, outputs: Mapping[str, np.ndarray], frames: Sequence[Frame | None],
              answering: Answering) -> list[dict[str, Any]]:
        if self.layout == "nms":
            return [{"detections": self.placed(*self.decode_nms(outputs, i),
                                               frame or self.tensor_frame)}
                    for i, frame in enumerate(frames)]
        batch = np.asarray(outputs[self.outputs[0]], dtype=np.float32)
        results: list[dict[str, Any]] = []
        for prediction, frame in zip(batch, frames, strict=True):
            results.append({"detections": self.detect(prediction, frame or self.tensor_frame)})
        return results

    def decode_nms(self, outputs: Mapping[str, np.ndarray], item: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boxes (x1, y1, x2, y2 in input pixels), scores and class indices of item
        ``item`` of a graph with NMS inside, at or above the confidence, best first, capped."""
        opts = self.options
        if opts.outputs is None:
            rows = np.asarray(outputs[self.outputs[0]][item], dtype=np.float32)
            boxes, scores, classes = rows[:, :4], rows[:, 4], rows[:, 5]
        else:
            boxes = np.asarray(outputs[opts.outputs.boxes][item], dtype=np.float32)
            scores = np.asarray(outputs[opts.outputs.scores][item], dtype=np.float32)
            classes = np.asarray(outputs[opts.outputs.classes][item], dtype=np.float32)
            if opts.outputs.count is not None:
                valid = int(np.asarray(outputs[opts.outputs.count][item]).reshape(-1)[0])
                boxes, scores, classes = boxes[:valid], scores[:valid], classes[:valid]
        if opts.boxFormat == "yxyx":
            boxes = boxes[:, [1, 0, 3, 2]]
        if opts.normalized:
            width, height = self.input_size
            boxes = boxes * np.asarray([width, height, width, height], dtype=np.float32)
        kept = np.flatnonzero(scores >= opts.confidence)
        kept = kept[np.argsort(-scores[kept], kind="stable")][:opts.maxDetections]
        indices = np.rint(classes[kept]).astype(np.int64) - opts.classOffset
        return boxes[kept], scores[kept], indices

    def detect(self, prediction: np.ndarray, frame: Frame) -> list[dict[str, Any]]:
        """The detections of one item, best first."""
        opts = self.options
        layout: Literal["yolov5", "yolov8"] = "yolov8" if self.layout == "yolov8" else "yolov5"
        boxes, scores, classes = decode_yolo(prediction, layout, opts.confidence)
        if len(scores) > opts.maxCandidates:
            best = np.argsort(-scores, kind="stable")[:opts.maxCandidates]
            boxes, scores, classes = boxes[best], scores[best], classes[best]
        if opts.classAgnostic:
            kept = nms(boxes, scores, opts.iou, opts.maxDetections)
        else:
            kept = class_aware_nms(boxes, scores, classes, opts.iou, opts.maxDetections)
        return self.placed(boxes[kept], scores[kept], classes[kept], frame)

    def placed(self, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
               frame: Frame) -> list[dict[str, Any]]:
        """Detections with boxes in the original image's pixels; a class id the labels do
        not name (a graph with NMS inside can answer any) has a null label."""
        return [
            {"label": self.labels[int(c)] if 0 <= int(c) < len(self.labels) else None,
             "score": round(float(s), 6),
             "box": {"x1": round(float(b[0]), 2), "y1": round(float(b[1]), 2),
                     "x2": round(float(b[2]), 2), "y2": round(float(b[3]), 2)}}
            for b, s, c in zip(to_original(boxes, frame), scores, classes, strict=True)
        ]
