"""Models: an ONNX file plus a JSON descriptor, loaded into an onnxruntime session.

The descriptor (``descriptor.py``, docs/models.md) says what the model takes (an
image with its size, layout and normalisation, or a numeric tensor of a fixed
shape), which output head reads its answers, its labels, and how its use is
billed (meter name and apiType). A model may instead take several named
tensor inputs (descriptor ``inputs``) of any numeric dtype with dynamic sizes;
an item of such a model is a dict of arrays by input name (``Item``). Loading
checks the graph's inputs (names, dtype, rank, fixed sizes), warns of a dynamic input
without ``maxShape`` (the default bound applies), runs a one-item
probe whose output shapes the head checks (``heads/``), computes the file's
sha256 for provenance and warms the session up so the first real request pays
no start-up cost. A model that does not fit is refused here with a
``ModelError`` naming its inputs and outputs.
Loaded by whichever thread loads models (start-up, or the control thread on a
reload); ``run`` is called by the pipeline's inference thread.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_module.config import BUILTIN_MODELS, ModelSettings, descriptor_path
from edge_module.exceptions import ModelError
from edge_module.inference.descriptor import (
    TENSOR_TYPES,
    Descriptor,
    ImageInput,
    Metering,
    NamedInput,
    Output,
    TensorInput,
    load_descriptor,
)
from edge_module.inference.encryption import decrypt_model, is_encrypted
from edge_module.inference.heads import Head, HeadMismatch, build_head
from edge_module.logs import get_logger

__all__ = ["Descriptor", "ImageInput", "Item", "Metering", "Model", "NamedInput", "Output",
           "Provenance", "TensorInput", "load_descriptor", "load_model", "model_path"]

log = get_logger("models")

# One item: a float32 array (a model of one ``input``), or its arrays by input name (a
# model of named ``inputs``).
Item = np.ndarray | dict[str, np.ndarray]


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
    """A loaded, warmed-up model with its output head. ``run`` takes a batch."""

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
        # The named tensor inputs (empty for a model of one ``input``).
        self.named_inputs: tuple[NamedInput, ...] = tuple(self.descriptor.inputs or ())
        # Per named input, the graph's name of each item size (None: fixed or unnamed).
        self.dim_names: dict[str, tuple[str | None, ...]] = {}
        if self.named_inputs:
            self.item_shape: tuple[int, ...] = ()
            self.batch_limit = self._check_named_inputs()
            self._note_default_bounds()
        else:
            self.item_shape, self.batch_limit = self._check_inputs()
        shapes = self._probe()
        try:
            self.head: Head = build_head(self.descriptor, shapes)
        except HeadMismatch as exc:
            raise ModelError(
                f"{path}: {exc}. The graph takes {self._graph_inputs()} and answers "
                + ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
                + " for one item; fix: name a head that fits in the descriptor's \"head\" "
                "or correct its labels / output (docs/models.md)") from None
        self.labels = self.descriptor.labels

    def _graph_inputs(self) -> str:
        return ", ".join(f"{i.name} {i.shape} {i.type}" for i in self.session.get_inputs())

    def _graph_outputs(self) -> str:
        return ", ".join(f"{o.name} {o.shape} {o.type}" for o in self.session.get_outputs())

    def _check_named_inputs(self) -> int | None:
        """Check the named inputs against the graph's; the batch size the graph fixes."""
        inputs = {i.name: i for i in self.session.get_inputs()}
        where = (f"{self.path}: the graph takes {self._graph_inputs()} and answers "
                 f"{self._graph_outputs()}")
        declared = [spec.name for spec in self.named_inputs]
        unknown = [n for n in declared if n not in inputs]
        missing = [n for n in inputs if n not in declared]
        if unknown or missing:
            raise ModelError(
                f"{where}; the descriptor's inputs name {', '.join(declared)}"
                + (f": {', '.join(unknown)} not in the graph" if unknown else "")
                + (f"; {', '.join(missing)} would be missing" if missing else "")
                + ": list every graph input once in \"inputs\"")
        batches: set[int] = set()
        for spec in self.named_inputs:
            graph = inputs[spec.name]
            # A dynamic size the graph names (e.g. "L" in two inputs) ties those sizes.
            self.dim_names[spec.name] = tuple(d if isinstance(d, str) and d else None
                                              for d in graph.shape[1:])
            if graph.type != TENSOR_TYPES[spec.dtype]:
                raise ModelError(f"{where}; input {spec.name} is {graph.type}, the descriptor "
                                 f"says {spec.dtype} ({TENSOR_TYPES[spec.dtype]})")
            if len(graph.shape) != 1 + len(spec.shape):
                raise ModelError(f"{where}; input {spec.name} has rank {len(graph.shape)}, so "
                                 f"its item shape has {len(graph.shape) - 1} sizes (batch "
                                 f"first, left out), not {spec.shape}")
            for i, (want, actual) in enumerate(zip(spec.shape, graph.shape[1:], strict=True)):
                if isinstance(actual, int) and actual > 0 and want != actual:
                    raise ModelError(f"{where}; input {spec.name} fixes size {i + 1} to "
                                     f"{actual}; the descriptor's shape {spec.shape} says "
                                     f"{want}: give {actual}")
            if isinstance(graph.shape[0], int) and graph.shape[0] > 0:
                batches.add(graph.shape[0])
        return min(batches) if batches else None

    def _note_default_bounds(self) -> None:
        """Warn of each dynamic input that gives no ``maxShape``: it serves, bounded by a
        default that may be too generous for a conv model or too tight for its use."""
        for spec in self.named_inputs:
            if spec.dynamic and spec.maxShape is None:
                low, high = spec.bounds()
                log.warning("model_input_unbounded", model=self.descriptor.name,
                            input=spec.name, shape=spec.shape, default_max_shape=list(high),
                            min_shape=list(low),
                            effect="larger items are refused TensorTooLarge at intake",
                            fix="give the input a maxShape in the descriptor (the largest "
                            "item the model serves in reasonable time and memory)")

    def probe_feeds(self) -> dict[str, np.ndarray]:
        """One zero item per input, dynamic sizes from ``probeShape`` (or 1)."""
        if self.named_inputs:
            return {spec.name: np.zeros((1, *spec.probe()), dtype=spec.dtype)
                    for spec in self.named_inputs}
        return {self.descriptor.input_names()[0]:
                np.zeros((1, *self.item_shape), dtype=np.float32)}

    def _check_inputs(self) -> tuple[tuple[int, ...], int | None]:
        """The per-item input shape, and the batch size when the graph fixes one."""
        spec = self.descriptor.input
        assert spec is not None
        inputs = {i.name: i for i in self.session.get_inputs()}
        where = f"{self.path}: the graph takes {self._graph_inputs()}"
        if spec.name not in inputs:
            raise ModelError(f"{where}; the descriptor's input {spec.name!r} is not one of them")
        others = [name for name in inputs if name != spec.name]
        if others:
            raise ModelError(f"{where}; this module feeds one input ({spec.name}), so "
                             f"{', '.join(others)} would be missing: serve a single-input model")
        graph = inputs[spec.name]
        if graph.type != "tensor(float)":
            raise ModelError(f"{where}; input {spec.name} must be float32 (tensor(float)): "
                             "the module feeds float32")
        if isinstance(spec, ImageInput):
            if spec.layout == "NCHW":
                shape: tuple[int, ...] = (spec.channels, spec.height, spec.width)
            else:
                shape = (spec.height, spec.width, spec.channels)
        else:
            shape = tuple(spec.shape)
        if len(graph.shape) != 1 + len(shape):
            raise ModelError(f"{where}; the descriptor gives items of shape {list(shape)}, so "
                             f"the input needs rank {1 + len(shape)} (batch first), not "
                             f"{len(graph.shape)}")
        for declared, actual in zip(shape, graph.shape[1:], strict=True):
            if isinstance(actual, int) and actual != declared:
                raise ModelError(f"{where}; descriptor shape {list(shape)} does not match the "
                                 f"graph's {graph.shape[1:]}")
        batch = graph.shape[0]
        return shape, batch if isinstance(batch, int) and batch > 0 else None

    def _probe(self) -> dict[str, tuple[int, ...]]:
        """Every output's shape for one zero item: what the head is checked against."""
        feeds = self.probe_feeds()
        try:
            values = self.session.run(None, feeds)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            shapes = ", ".join(f"{n} {list(v.shape[1:])}" for n, v in feeds.items())
            raise ModelError(f"{self.path}: the model fails on one zero item ({shapes}): "
                             f"{exc}; fix: check the descriptor's input sizes (for dynamic "
                             "ones, give probeShape)") from None
        names = [o.name for o in self.session.get_outputs()]
        return {name: tuple(np.asarray(v).shape) for name, v in zip(names, values, strict=True)}

    def warm_up(self) -> None:
        """Run a zero batch once so allocations and kernel choice happen now."""
        self.run(self.probe_feeds())

    def stack(self, items: Sequence[Item]) -> dict[str, np.ndarray]:
        """The feeds of a batch of items (named items must share their shapes)."""
        if self.named_inputs:
            named = [item for item in items if isinstance(item, dict)]
            return {spec.name: np.stack([item[spec.name] for item in named])
                    for spec in self.named_inputs}
        arrays = [item for item in items if isinstance(item, np.ndarray)]
        return {self.descriptor.input_names()[0]: np.stack(arrays)}

    def run(self, batch: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The head's outputs by name for a batch, batch first: a float32 array
        ``[N, *item_shape]`` for a model of one input, or the feeds by input name."""
        names = list(self.head.outputs)
        feeds = {self.descriptor.input_names()[0]: batch} if isinstance(batch, np.ndarray) \
            else dict(batch)
        values = self.session.run(names, feeds)
        return {name: np.asarray(v) for name, v in zip(names, values, strict=True)}


def load_model(settings: ModelSettings,
               model_key: Callable[[str], str | None] | None = None) -> Model:
    model = Model(model_path(settings), settings.intra_op_threads, settings.inter_op_threads,
                  model_key, settings.graph_optimization, settings.execution_mode)
    model.warm_up()
    return model
