"""The ``tensor`` head: every output returned as a named tensor, for models that are
neither classifiers nor detectors (maps, embeddings, anomaly scores).

Each item's result is ``{"outputs": [{"name", "shape", "dtype", "data"}]}`` with
``data`` a nested JSON list (NaN and infinities as null, which JSON cannot
carry); a request with ``"output": "npy"`` gets ``"npy"`` instead of ``data``:
the tensor as base64 ``.npy`` bytes (exact, NaN included, ~1.33 bytes per
byte instead of ~10 per value). At load every output must have the batch
first (``[1, ...]`` for a one-item probe) and at most ``headOptions.maxElements``
values per item for the probe; with dynamic input sizes the outputs can grow,
so each answer is checked again and one over the limit is refused
(``OutputTooLarge``, not billed). Runs on the pipeline's commit thread.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edge_module.errors import ErrorCode
from edge_module.exceptions import Refusal
from edge_module.inference.descriptor import Descriptor
from edge_module.inference.heads.base import Answering, Frame, HeadMismatch, Shapes, options


class TensorOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # The outputs to return, in this order; empty: every output of the graph.
    outputs: list[str] = Field(default_factory=list)
    # Most values per item over all returned outputs (JSON costs ~10 bytes per value).
    maxElements: int = Field(65_536, ge=1, le=4_194_304)


def as_npy(values: np.ndarray) -> str:
    """The tensor as base64 ``.npy`` bytes (``numpy.load`` reads them back)."""
    out = io.BytesIO()
    np.save(out, values, allow_pickle=False)  # (ascontiguousarray would make a 0-d array 1-d)
    return base64.b64encode(out.getvalue()).decode("ascii")


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

    def __init__(self, outputs: tuple[str, ...], max_elements: int = 65_536) -> None:
        self.outputs = outputs
        self.max_elements = max_elements

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
        return cls(names, opts.maxElements)

    def shape(self, outputs: Mapping[str, np.ndarray], frames: Sequence[Frame | None],
              answering: Answering) -> list[dict[str, Any]]:
        count = len(frames)
        results: list[dict[str, Any]] = []
        elements = sum(math.prod(outputs[name].shape[1:]) for name in self.outputs)
        if elements > self.max_elements:
            raise Refusal(ErrorCode.OUTPUT_TOO_LARGE,
                          f"the outputs hold {elements:,} values per item; the model's "
                          f"headOptions.maxElements is {self.max_elements:,}: send smaller "
                          "inputs")
        npy = answering.tensors == "npy"
        for i in range(count):
            tensors = []
            for name in self.outputs:
                value = np.asarray(outputs[name][i])
                tensor: dict[str, Any] = {"name": name, "shape": list(value.shape),
                                          "dtype": str(value.dtype)}
                if npy:
                    tensor["npy"] = as_npy(value)
                else:
                    tensor["data"] = as_json(value)
                tensors.append(tensor)
            results.append({"outputs": tensors})
        return results
