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


class DetectionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    layout: Literal["auto", "yolov5", "yolov8"] = "auto"
    confidence: float = Field(0.25, gt=0, le=1)
    iou: float = Field(0.45, gt=0, le=1)
    maxDetections: int = Field(100, ge=1, le=1000)
    # Most candidates (best scores first) that enter NMS, which costs O(kept x candidates).
    maxCandidates: int = Field(30_000, ge=1)
    classAgnostic: bool = False


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


class DetectionHead:
    name = "detection"

    def __init__(self, output: str, labels: list[str], layout: Literal["yolov5", "yolov8"],
                 opts: DetectionOptions, input_size: tuple[int, int] = (0, 0)) -> None:
        self.outputs: tuple[str, ...] = (output,)
        # An item sent as a tensor is already in the model's pixels: its boxes stay there.
        self.tensor_frame = Frame(*input_size)
        self.labels = labels
        self.layout = layout
        self.options = opts

    @classmethod
    def build(cls, descriptor: Descriptor, shapes: Shapes) -> DetectionHead:
        opts = options(DetectionOptions, descriptor)
        if not isinstance(descriptor.input, ImageInput):
            raise HeadMismatch("the detection head needs an image input (boxes are given "
                               "in the image's pixels)")
        output = one_output(descriptor, shapes)
        shape = shapes[output]
        count = len(descriptor.labels)
        if count == 0:
            raise HeadMismatch("the descriptor has no labels; a detector needs one per class")
        if len(shape) != 3 or shape[0] != 1:
            raise HeadMismatch(f"output {output!r} has shape {list(shape)} for one item; a "
                               "YOLO detector answers [1, 4+C, N] or [1, N, 5+C]")
        fits: list[Literal["yolov5", "yolov8"]] = []
        if shape[1] == 4 + count:
            fits.append("yolov8")
        if shape[2] == 5 + count:
            fits.append("yolov5")
        if opts.layout != "auto":
            if opts.layout not in fits:
                raise HeadMismatch(
                    f"output {output!r} has shape {list(shape)}; layout {opts.layout} with "
                    f"{count} labels needs " + (f"[1, {4 + count}, N]" if opts.layout ==
                                                "yolov8" else f"[1, N, {5 + count}]"))
            layout = opts.layout
        elif len(fits) == 1:
            layout = fits[0]
        elif not fits:
            raise HeadMismatch(
                f"output {output!r} has shape {list(shape)}, which fits {count} labels in "
                f"neither YOLO layout: YOLOv8/11 [1, {4 + count}, N] or YOLOv5 "
                f"[1, N, {5 + count}]; check the labels (one per class)")
        else:
            raise HeadMismatch(f"output {output!r} has shape {list(shape)}, which fits both "
                               "YOLO layouts: set headOptions.layout")
        size = (descriptor.input.width, descriptor.input.height)
        return cls(output, descriptor.labels, layout, opts, size)

    def shape(self, outputs: Mapping[str, np.ndarray], frames: Sequence[Frame | None],
              answering: Answering) -> list[dict[str, Any]]:
        batch = np.asarray(outputs[self.outputs[0]], dtype=np.float32)
        results: list[dict[str, Any]] = []
        for prediction, frame in zip(batch, frames, strict=True):
            results.append({"detections": self.detect(prediction, frame or self.tensor_frame)})
        return results

    def detect(self, prediction: np.ndarray, frame: Frame) -> list[dict[str, Any]]:
        """The detections of one item, best first."""
        opts = self.options
        boxes, scores, classes = decode_yolo(prediction, self.layout, opts.confidence)
        if len(scores) > opts.maxCandidates:
            best = np.argsort(-scores, kind="stable")[:opts.maxCandidates]
            boxes, scores, classes = boxes[best], scores[best], classes[best]
        if opts.classAgnostic:
            kept = nms(boxes, scores, opts.iou, opts.maxDetections)
        else:
            kept = class_aware_nms(boxes, scores, classes, opts.iou, opts.maxDetections)
        placed = to_original(boxes[kept], frame)
        return [
            {"label": self.labels[int(c)], "score": round(float(s), 6),
             "box": {"x1": round(float(b[0]), 2), "y1": round(float(b[1]), 2),
                     "x2": round(float(b[2]), 2), "y2": round(float(b[3]), 2)}}
            for b, s, c in zip(placed, scores[kept], classes[kept], strict=True)
        ]
