"""The model descriptor: the JSON file beside each ``.onnx`` that says how to feed and read it.

Owns the format (pydantic, ``extra="forbid"``) and reading it from disk; no
thread of its own (read while a model loads). docs/models.md documents every
field. The head named by ``head`` validates ``headOptions`` with its own schema
(``edge_module/inference/heads/``), so a new head needs no change here.

Inputs: either one ``input`` (an image, or a float32 tensor of a fixed item
shape) or a list ``inputs`` of named tensors, each with its dtype and an item
shape in which ``-1`` marks a dynamic size (any length, request by request).

Normalisation rule: ``mean`` and ``std`` hold either one value, applied to every
channel, or exactly one value per channel; any other length is refused at load.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge_module.exceptions import ModelError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageInput(_Strict):
    """An image model input: decoded, resized and normalised like cv2.dnn.blobFromImage."""

    name: str
    kind: Literal["image"]
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    channels: Literal[1, 3]
    # "stretch" resizes to width x height ignoring the aspect ratio; "letterbox" keeps
    # it and pads the rest with padValue (YOLO's training resize).
    resize: Literal["stretch", "letterbox"] = "stretch"
    interpolation: Literal["area", "linear", "nearest", "cubic"] = "area"
    padValue: float = Field(114.0, ge=0, le=255)
    scale: float = 1 / 255
    mean: list[float] = Field(default_factory=lambda: [0.0], min_length=1)
    std: list[float] = Field(default_factory=lambda: [1.0], min_length=1)
    swapRB: bool = False

    @model_validator(mode="after")
    def _per_channel(self) -> ImageInput:
        for field in ("mean", "std"):
            values = getattr(self, field)
            if len(values) not in (1, self.channels):
                raise ValueError(
                    f"{field} has {len(values)} values for a {self.channels}-channel image: "
                    f"give one value (applied to every channel) or exactly {self.channels}")
        if any(s == 0 for s in self.std):
            raise ValueError("std must not contain 0")
        return self

    def channel_values(self, field: Literal["mean", "std"]) -> list[float]:
        """``mean`` or ``std`` with one value per channel (a single value repeated)."""
        values: list[float] = getattr(self, field)
        return values * self.channels if len(values) == 1 else list(values)


class TensorInput(_Strict):
    """A numeric input of a fixed per-item shape, e.g. ``[8]`` sensor readings."""

    name: str
    kind: Literal["tensor"]
    shape: list[int] = Field(min_length=1)


# Element types a named tensor input may declare (numpy names; onnxruntime's in TENSOR_TYPES).
TENSOR_TYPES: dict[str, str] = {
    "float32": "tensor(float)", "float64": "tensor(double)", "float16": "tensor(float16)",
    "int64": "tensor(int64)", "int32": "tensor(int32)", "int16": "tensor(int16)",
    "int8": "tensor(int8)", "uint8": "tensor(uint8)", "uint16": "tensor(uint16)",
    "uint32": "tensor(uint32)", "uint64": "tensor(uint64)", "bool": "tensor(bool)",
}
TensorType = Literal["float32", "float64", "float16", "int64", "int32", "int16", "int8",
                     "uint8", "uint16", "uint32", "uint64", "bool"]


# One item of a named input with dynamic sizes and no ``maxShape`` holds at most this many
# values with every dynamic size at its default maximum (1/16 of the default
# Pipeline:MaxTensorElements): a conv model's activations are many times its input, and a
# 16 M-value [3, 2365, 2365] image would hold the one inference thread for tens of seconds.
DEFAULT_DYNAMIC_ELEMENTS = 1 << 20


class NamedInput(_Strict):
    """One of a model's named tensor inputs (descriptor ``inputs``): its per-item shape,
    batch dimension left out, with ``-1`` for a dynamic size, and its element type.

    Each dynamic size lies between ``minShape`` and ``maxShape`` (aligned with ``shape``,
    a fixed size repeated as it is): by default at least 1 (a zero-length size only where
    ``minShape`` gives 0) and at most ``default_max`` (``DEFAULT_DYNAMIC_ELEMENTS`` shared
    evenly among the dynamic sizes). ``bounds`` gives both; ``size_refusal`` checks an item
    shape against them."""

    name: str = Field(min_length=1)
    kind: Literal["tensor"] = "tensor"
    shape: list[int] = Field(max_length=8)
    dtype: TensorType = "float32"
    # The item shape the load probe and the warm-up run (every -1 given a size); by
    # default each -1 becomes 1, which a model that downsamples (a map) may refuse.
    probeShape: list[int] | None = None
    # The largest and smallest item shape accepted at intake, aligned with shape.
    maxShape: list[int] | None = None
    minShape: list[int] | None = None

    @model_validator(mode="after")
    def _sizes(self) -> NamedInput:
        if any(d == 0 or d < -1 for d in self.shape):
            raise ValueError(f"shape {self.shape}: each size is > 0, or -1 for a dynamic one")
        if self.probeShape is not None and (len(self.probeShape) != len(self.shape) or any(
                p <= 0 or (d != -1 and p != d)
                for p, d in zip(self.probeShape, self.shape, strict=True))):
            raise ValueError(f"probeShape {self.probeShape} must give shape {self.shape} "
                             "with every -1 replaced by a size > 0")
        for field, least in (("maxShape", 1), ("minShape", 0)):
            given: list[int] | None = getattr(self, field)
            if given is None:
                continue
            if len(given) != len(self.shape):
                raise ValueError(f"{field} {given} has {len(given)} sizes; shape {self.shape} "
                                 f"has {len(self.shape)}: give one size per dimension")
            for i, (g, d) in enumerate(zip(given, self.shape, strict=True)):
                if d != -1 and g != d:
                    raise ValueError(f"{field} {given}: shape {self.shape} fixes dimension {i} "
                                     f"to {d}; write {d} there, not {g}")
                if d == -1 and g < least:
                    raise ValueError(f"{field} {given}: dimension {i} is dynamic; its "
                                     f"{'largest' if least else 'smallest'} size must be "
                                     f">= {least}, not {g}")
        low, high = self.bounds()
        for i, (lo, hi) in enumerate(zip(low, high, strict=True)):
            if lo > hi:
                raise ValueError(f"dimension {i}: minShape {list(low)} exceeds maxShape "
                                 f"{list(high)} there")
        probe = self.probe()
        if any(not lo <= p <= hi for p, lo, hi in zip(probe, low, high, strict=True)):
            raise ValueError(f"probeShape {list(probe)} must lie between minShape {list(low)} "
                             f"and maxShape {list(high)}")
        return self

    @property
    def dynamic(self) -> bool:
        return -1 in self.shape

    def probe(self) -> tuple[int, ...]:
        """The item shape the load probe runs."""
        if self.probeShape is not None:
            return tuple(self.probeShape)
        return tuple(1 if d == -1 else d for d in self.shape)

    def default_max(self) -> tuple[int, ...]:
        """The ``maxShape`` of an input that gives none: each dynamic size at most the
        largest ``n`` with ``fixed sizes x n^k <= DEFAULT_DYNAMIC_ELEMENTS`` (k dynamic
        sizes), and never below its ``probeShape`` size."""
        dynamic = self.shape.count(-1)
        if not dynamic:
            return tuple(self.shape)
        budget = DEFAULT_DYNAMIC_ELEMENTS // math.prod(d for d in self.shape if d != -1)
        size = max(1, round(budget ** (1 / dynamic)))
        while size > 1 and size ** dynamic > budget:
            size -= 1
        while (size + 1) ** dynamic <= budget:
            size += 1
        return tuple(max(size, p) if d == -1 else d
                     for d, p in zip(self.shape, self.probe(), strict=True))

    def bounds(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The smallest and largest item shape accepted (``minShape``, ``maxShape`` or
        their defaults)."""
        low = tuple(self.minShape) if self.minShape is not None else \
            tuple(1 if d == -1 else d for d in self.shape)
        high = tuple(self.maxShape) if self.maxShape is not None else self.default_max()
        return low, high

    def size_refusal(self, item: tuple[int, ...]) -> tuple[bool, str] | None:
        """Why an item shape (of this input's rank) is refused: (too large, the sentence
        naming the input, the dimension and the limit), or None when it lies within
        ``bounds``."""
        low, high = self.bounds()
        for i, (got, lo, hi) in enumerate(zip(item, low, high, strict=True)):
            if got > hi:
                return True, (f"input {self.name} has size {got} at dimension {i} of its item "
                              f"shape {list(item)} (batch left out); the model takes at most "
                              f"{hi} there (maxShape {list(high)})")
            if got < lo:
                allowed = "; a zero-length size needs minShape 0 there" if got == 0 else ""
                return False, (f"input {self.name} has size {got} at dimension {i} of its item "
                               f"shape {list(item)} (batch left out); the model takes at least "
                               f"{lo} there (minShape {list(low)}){allowed}")
        return None


class Output(_Strict):
    name: str
    kind: Literal["probabilities", "logits"] = "probabilities"


class Metering(_Strict):
    meterName: str
    apiType: str
    quantityPerItem: int = Field(1, ge=1)


class Descriptor(_Strict):
    name: str
    version: str
    description: str = ""
    # Exactly one of ``input`` (one image or float32 tensor) and ``inputs`` (named tensors).
    input: Annotated[ImageInput | TensorInput, Field(discriminator="kind")] | None = None
    inputs: list[NamedInput] | None = Field(None, min_length=1, max_length=64)
    # The output head (edge_module/inference/heads/) that turns outputs into answers.
    head: str = "classification"
    headOptions: dict[str, Any] = Field(default_factory=dict)
    output: Output | None = None
    labels: list[str] = Field(default_factory=list)
    metering: Metering
    features: list[str] | None = None
    heldOutAccuracy: float | None = None
    # Most items per session.run for this model (Triton's max_batch_size): large inputs
    # need smaller batches, or activations dominate memory. None: Pipeline:MaxBatchSize.
    maxBatch: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_input_form(self) -> Descriptor:
        if (self.input is None) == (self.inputs is None):
            raise ValueError("give exactly one of input (one image or tensor) and inputs "
                             "(a list of named tensors)")
        names = [spec.name for spec in self.inputs or ()]
        if len(set(names)) != len(names):
            raise ValueError(f"inputs name {names}: each name once")
        return self

    def input_names(self) -> list[str]:
        """The names of the graph inputs this descriptor feeds."""
        if self.inputs is not None:
            return [spec.name for spec in self.inputs]
        assert self.input is not None
        return [self.input.name]


def load_descriptor(path: Path) -> Descriptor:
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise ModelError(f"model descriptor {path} cannot be read: {exc.strerror}") from exc
    except ValueError as exc:
        raise ModelError(f"model descriptor {path} is not valid JSON: {exc}") from exc
    try:
        return Descriptor.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ModelError(f"model descriptor {path}: {where}: {first['msg']}") from exc
