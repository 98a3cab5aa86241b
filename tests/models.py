"""Small ONNX graphs built for tests, each with its descriptor (nothing downloaded).

* ``fragile_model``: a tensor model that onnxruntime fails on for some inputs: each
  item's one value is used as an index into a table of ten, so a value outside 0..9
  makes ``session.run`` raise (``InferenceFailed``), while 0..9 are answered.
* ``slow_model``: a tensor model that takes a while per ``session.run`` (a square
  matrix product sized by ``size``, computed from the input so that onnxruntime cannot
  fold it at load), one item per batch: a request stays in flight long enough for the
  next one to arrive behind it.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
from onnx import TensorProto, helper


def save_graph(graph: onnx.GraphProto, path: Path, opset: int = 17,
               descriptor: dict[str, object] | None = None) -> Path:
    """``graph`` as a checked ONNX file at ``path`` (IR 8: what this onnxruntime reads),
    with ``descriptor`` beside it when given (``model.json`` in a repository version
    folder, ``<stem>.json`` otherwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    if descriptor is not None:
        beside = path.with_name("model.json") if path.name == "model.onnx" else \
            path.with_suffix(".json")
        beside.write_text(json.dumps(descriptor))
    return path


def _save(folder: Path, stem: str, graph: onnx.GraphProto, descriptor: dict[str, object]
          ) -> Path:
    return save_graph(graph, folder / f"{stem}.onnx", descriptor=descriptor)


def _descriptor(name: str, **extra: object) -> dict[str, object]:
    return {"name": name, "version": "1", "head": "tensor",
            "input": {"name": "x", "kind": "tensor", "shape": [1]},
            "metering": {"meterName": f"{name}.tensor", "apiType": "test"}, **extra}


def fragile_model(folder: Path, stem: str = "fragile", name: str = "fragile") -> Path:
    table = helper.make_tensor("table", TensorProto.FLOAT, [10], [float(i) for i in range(10)])
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["index"], to=TensorProto.INT64),
         helper.make_node("Gather", ["table", "index"], ["y"], axis=0)],
        name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])], [table])
    return _save(folder, stem, graph, _descriptor(name))


def slow_model(folder: Path, size: int = 2000, stem: str = "slow", name: str = "slow"
               ) -> Path:
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [size, size])
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
         helper.make_node("Expand", ["s", "shape"], ["m"]),
         helper.make_node("MatMul", ["m", "m"], ["p"]),
         helper.make_node("ReduceMean", ["p"], ["mean"], keepdims=0),
         helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
         helper.make_node("Add", ["x", "nothing"], ["y"])],
        name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])], [shape, zero])
    return _save(folder, stem, graph, _descriptor(name, maxBatch=1))


def wide_int_model(folder: Path, elements: int, size: int = 1500, stem: str = "wide",
                   name: str = "wide") -> Path:
    """A slow model of one named ``int64`` input of ``elements`` values per item, one item
    per batch: a ``uint8`` ``.npy`` sent to it decodes to 8 times its size, and each
    request stays a while in inference (a ``size`` x ``size`` matrix product), so that
    decoded requests pile up behind it."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [size, size])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["ids", "axes"], ["total"], keepdims=1),
         helper.make_node("Cast", ["total"], ["t"], to=TensorProto.FLOAT),
         helper.make_node("ReduceSum", ["t"], ["s"], keepdims=0),
         helper.make_node("Expand", ["s", "shape"], ["m"]),
         helper.make_node("MatMul", ["m", "m"], ["p"]),
         helper.make_node("ReduceMean", ["p"], ["mean"], keepdims=0),
         helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
         helper.make_node("Add", ["t", "nothing"], ["y"])],
        name, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", elements])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])],
        [shape, axes, zero])
    descriptor: dict[str, object] = {
        "name": name, "version": "1", "head": "tensor", "maxBatch": 1,
        "inputs": [{"name": "ids", "shape": [elements], "dtype": "int64"}],
        "metering": {"meterName": f"{name}.tensor", "apiType": "test"}}
    return _save(folder, stem, graph, descriptor)
