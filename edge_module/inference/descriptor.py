"""The model descriptor: the JSON file beside each ``.onnx`` that says how to feed and read it.

Owns the format (pydantic, ``extra="forbid"``) and reading it from disk; no
thread of its own (read while a model loads). docs/models.md documents every
field. The head named by ``head`` validates ``headOptions`` with its own schema
(``edge_module/inference/heads/``), so a new head needs no change here.

Normalisation rule: ``mean`` and ``std`` hold either one value, applied to every
channel, or exactly one value per channel; any other length is refused at load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

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
    input: ImageInput | TensorInput = Field(discriminator="kind")
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
