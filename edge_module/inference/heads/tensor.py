"""The ``tensor`` head: every output returned as a named tensor, for models that are
neither classifiers nor detectors (maps, embeddings, anomaly scores).

Each item's result is ``{"outputs": [{"name", "shape", "dtype", "data"}]}`` with
``data`` a nested JSON list (NaN and infinities as null, which JSON cannot
carry). At load every output must have the batch first (``[1, ...]`` for a
one-item probe) and at most ``headOptions.maxElements`` values per item, so
an answer is never too large to send. Runs on the pipeline's commit thread.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edge_module.inference.descriptor import Descriptor
from edge_module.inference.heads.base import Answering, Frame, HeadMismatch, Shapes, options


class TensorOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # The outputs to return, in this order; empty: every output of the graph.
    outputs: list[str] = Field(default_factory=list)
    # Most values per item over all returned outputs (JSON costs ~10 bytes per value).
    maxElements: int = Field(65_536, ge=1, le=4_194_304)


def as_json(values: np.ndarray) -> list[Any]:
    """A nested list; non-finite floats become None."""
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        boxed = values.astype(object)
        boxed[~np.isfinite(values)] = None
        data: list[Any] = boxed.tolist()
        return data
    listed: list[Any] = values.tolist()
    return listed


class TensorHead:
    name = "tensor"

    def __init__(self, outputs: tuple[str, ...]) -> None:
        self.outputs = outputs

    @classmethod
    def build(cls, descriptor: Descriptor, shapes: Shapes) -> TensorHead:
        opts = options(TensorOptions, descriptor)
        names = tuple(opts.outputs) or tuple(shapes)
        missing = [n for n in names if n not in shapes]
        if missing:
            raise HeadMismatch(f"headOptions.outputs names {', '.join(missing)}, not in the "
                               f"graph (outputs: {', '.join(shapes)})")
        for name in names:
            if not shapes[name] or shapes[name][0] != 1:
                raise HeadMismatch(f"output {name!r} has shape {list(shapes[name])} for one "
                                   "item: the tensor head needs the batch first")
        elements = sum(math.prod(shapes[n][1:]) for n in names)
        if elements > opts.maxElements:
            raise HeadMismatch(f"the outputs hold {elements:,} values per item; "
                               f"headOptions.maxElements is {opts.maxElements:,}: raise it "
                               "(up to 4,194,304) or name fewer outputs")
        return cls(names)

    def shape(self, outputs: Mapping[str, np.ndarray], frames: Sequence[Frame | None],
              answering: Answering) -> list[dict[str, Any]]:
        count = len(frames)
        results: list[dict[str, Any]] = []
        for i in range(count):
            tensors = []
            for name in self.outputs:
                value = np.asarray(outputs[name][i])
                tensors.append({"name": name, "shape": list(value.shape),
                                "dtype": str(value.dtype), "data": as_json(value)})
            results.append({"outputs": tensors})
        return results
