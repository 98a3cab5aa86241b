"""The ``classification`` head: class scores ``[N, classes]`` -> label, score and top K.

The default head, so descriptors written before heads existed keep working.
At load it requires one output of shape ``[1, len(labels)]`` for a one-item
probe: a descriptor with 3 labels on a 2-class model is refused there instead
of answering wrong labels. ``output.kind: "logits"`` applies a softmax.
Runs on the pipeline's commit thread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edge_module.inference.descriptor import Descriptor
from edge_module.inference.heads.base import Answering, Frame, HeadMismatch, Shapes, one_output


def shape_results(scores: np.ndarray, labels: list[str], top_k: int,
                  score_threshold: float = 0.0) -> list[dict[str, Any]]:
    """One ``{"label", "score", "topK"}`` per item, from the model's class scores.

    Classes scoring below ``score_threshold`` are left out of ``topK``; when even
    the best one is below it, ``label`` is null (the model is not confident) while
    ``score`` still gives the best score. Raises when the scores do not fit the
    labels: the pipeline shapes every answer before its usage is recorded, so an
    answer that cannot be shaped is an error and never billed.
    """
    k = min(top_k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    results: list[dict[str, Any]] = []
    for row, top in zip(scores, order, strict=True):
        best = round(float(row[top[0]]), 6)
        ranked = [{"label": labels[i], "score": round(float(row[i]), 6)} for i in top
                  if row[i] >= score_threshold]
        results.append({"label": ranked[0]["label"] if ranked else None, "score": best,
                        "topK": ranked})
    return results


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    out: np.ndarray = shifted / shifted.sum(axis=1, keepdims=True)
    return out


class ClassificationHead:
    name = "classification"

    def __init__(self, output: str, labels: list[str], logits: bool) -> None:
        self.outputs: tuple[str, ...] = (output,)
        self.labels = labels
        self.logits = logits

    @classmethod
    def build(cls, descriptor: Descriptor, shapes: Shapes) -> ClassificationHead:
        if descriptor.headOptions:
            raise HeadMismatch("the classification head takes no headOptions "
                               f"(got {', '.join(sorted(descriptor.headOptions))})")
        output = one_output(descriptor, shapes)
        shape = shapes[output]
        labels = descriptor.labels
        if len(shape) != 2 or shape[0] != 1:
            raise HeadMismatch(f"output {output!r} has shape {list(shape)} for one item; "
                               "a classifier answers [N, classes]")
        if not labels:
            raise HeadMismatch("the descriptor has no labels; a classifier needs one per "
                               f"class ({shape[1]} for this graph)")
        if shape[1] != len(labels):
            raise HeadMismatch(f"output {output!r} scores {shape[1]} classes but the "
                               f"descriptor has {len(labels)} labels: give one label per class")
        kind = descriptor.output.kind if descriptor.output is not None else "probabilities"
        return cls(output, labels, kind == "logits")

    def shape(self, outputs: Mapping[str, np.ndarray], frames: Sequence[Frame | None],
              answering: Answering) -> list[dict[str, Any]]:
        scores = np.asarray(outputs[self.outputs[0]], dtype=np.float32)
        if self.logits:
            scores = softmax(scores)
        return shape_results(scores, self.labels, answering.top_k, answering.score_threshold)
