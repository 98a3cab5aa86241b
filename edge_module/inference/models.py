"""Models: an ONNX file plus a JSON descriptor, loaded into an onnxruntime session.

The descriptor says what the model takes (an image with its size, layout and
normalisation, or a numeric tensor of a fixed shape), what it returns, its
labels, and how its use is billed (meter name and apiType). Loading verifies
the descriptor against the graph, computes the file's sha256 for provenance
and warms the session up so the first real request pays no start-up cost.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_module.config import BUILTIN_MODELS, ModelSettings, descriptor_path
from edge_module.exceptions import ModelError
from edge_module.inference.encryption import decrypt_model, is_encrypted


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
    scale: float = 1 / 255
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])
    swapRB: bool = False


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
    output: Output
    labels: list[str] = Field(min_length=1)
    metering: Metering
    features: list[str] | None = None
    heldOutAccuracy: float | None = None
    # Most items per session.run for this model (Triton's max_batch_size): large inputs
    # need smaller batches, or activations dominate memory. None: Pipeline:MaxBatchSize.
    maxBatch: int | None = Field(None, ge=1)


@dataclass(frozen=True)
class Provenance:
    name: str
    version: str
    sha256: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


def model_path(settings: ModelSettings) -> Path:
    """The .onnx file the settings select."""
    return settings.path if settings.path is not None else BUILTIN_MODELS / f"{settings.name}.onnx"


class Model:
    """A loaded, warmed-up model. ``run`` takes a batch and returns probabilities."""

    def __init__(self, path: Path, intra_op_threads: int = 1, inter_op_threads: int = 1,
                 model_key: Callable[[str], str | None] | None = None,
                 optimization: str = "all", execution_mode: str = "sequential") -> None:
        self.path = path
        self.descriptor = load_descriptor(descriptor_path(path))
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelError(f"cannot read model {path}: {exc.strerror}") from exc
        self.encrypted = is_encrypted(data)
        if self.encrypted:  # decrypted in memory only
            name = self.descriptor.name
            data = decrypt_model(data, model_key(name) if model_key else None, name)
        self.provenance = Provenance(
            self.descriptor.name, self.descriptor.version, hashlib.sha256(data).hexdigest()
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL \
            if execution_mode == "parallel" else ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                data, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelError(f"onnxruntime cannot load {path}: {exc}") from exc
        self.item_shape = self._check_graph()
        self.labels = self.descriptor.labels

    def _check_graph(self) -> tuple[int, ...]:
        spec = self.descriptor.input
        inputs = {i.name: i for i in self.session.get_inputs()}
        if spec.name not in inputs:
            raise ModelError(
                f"{self.path}: descriptor input {spec.name!r} is not in the graph "
                f"(graph inputs: {', '.join(inputs)})"
            )
        if isinstance(spec, ImageInput):
            if spec.layout == "NCHW":
                shape: tuple[int, ...] = (spec.channels, spec.height, spec.width)
            else:
                shape = (spec.height, spec.width, spec.channels)
        else:
            shape = tuple(spec.shape)
        graph_shape = inputs[spec.name].shape[1:]
        for declared, actual in zip(shape, graph_shape, strict=False):
            if isinstance(actual, int) and actual != declared:
                raise ModelError(
                    f"{self.path}: descriptor shape {list(shape)} does not match the graph's "
                    f"{graph_shape}"
                )
        outputs = [o.name for o in self.session.get_outputs()]
        if self.descriptor.output.name not in outputs:
            raise ModelError(f"{self.path}: output {self.descriptor.output.name!r} is not in "
                             f"the graph (outputs: {', '.join(outputs)})")
        return shape

    def warm_up(self) -> None:
        """Run a zero batch once so allocations and kernel choice happen now."""
        self.run(np.zeros((1, *self.item_shape), dtype=np.float32))

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities ``[N, classes]`` for a float32 batch ``[N, *item_shape]``."""
        out = self.session.run(
            [self.descriptor.output.name], {self.descriptor.input.name: batch}
        )[0]
        scores = np.asarray(out, dtype=np.float32)
        if self.descriptor.output.kind == "logits":
            shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
            scores = shifted / shifted.sum(axis=1, keepdims=True)
        return scores


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


def load_model(settings: ModelSettings,
               model_key: Callable[[str], str | None] | None = None) -> Model:
    model = Model(model_path(settings), settings.intra_op_threads, settings.inter_op_threads,
                  model_key, settings.graph_optimization, settings.execution_mode)
    model.warm_up()
    return model
