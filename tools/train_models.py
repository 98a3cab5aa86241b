"""Train the two default models and write them as ONNX files plus descriptors.

Run with ``make models``. The output is byte-identical on every run: training
is single-threaded with fixed seeds, and the ONNX graphs are written by hand
(no exporter with timestamps or random names), so ``git diff`` after a re-run
shows nothing unless the code or the pinned libraries changed.

* ``digits``: an MLP trained on scikit-learn's bundled 8x8 digits; takes a
  grey image as NCHW ``[N, 1, 8, 8]`` float in 0..1 and returns 10 class
  probabilities.
* ``telemetry``: an MLP that classifies the state of a centrifugal pump from
  eight sensor readings (a synthetic but physically plausible data set, made
  here with a fixed seed); takes ``[N, 8]`` float and returns 4 probabilities.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from threadpoolctl import threadpool_limits

from simulator.datasets import (
    TELEMETRY_FEATURES,
    TELEMETRY_LABELS,
    digits_split,
    telemetry_dataset,
)

OUT_DIR = Path(__file__).resolve().parent.parent / "edge_module" / "models"
OPSET = 13
IR_VERSION = 8
DIGITS_MIN_ACCURACY = 0.97

def mlp_graph(
    model: MLPClassifier,
    input_name: str,
    input_shape: list[Any],
    mean: np.ndarray | None = None,
    std: np.ndarray | None = None,
) -> onnx.ModelProto:
    """Write a one-hidden-layer ReLU MLP with softmax output as an ONNX graph."""
    nodes = []
    inits = []
    current = input_name
    if len(input_shape) > 2:
        nodes.append(helper.make_node("Flatten", [current], ["flat"], axis=1))
        current = "flat"
    if mean is not None and std is not None:
        inits.append(numpy_helper.from_array(mean.astype(np.float32), "mean"))
        inits.append(numpy_helper.from_array(std.astype(np.float32), "std"))
        nodes.append(helper.make_node("Sub", [current, "mean"], ["centred"]))
        nodes.append(helper.make_node("Div", ["centred", "std"], ["scaled"]))
        current = "scaled"
    w1, w2 = model.coefs_
    b1, b2 = model.intercepts_
    for name, value in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        inits.append(numpy_helper.from_array(value.astype(np.float32), name))
    nodes.append(helper.make_node("Gemm", [current, "w1", "b1"], ["hidden_pre"]))
    nodes.append(helper.make_node("Relu", ["hidden_pre"], ["hidden"]))
    nodes.append(helper.make_node("Gemm", ["hidden", "w2", "b2"], ["logits"]))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
    n_classes = w2.shape[1]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", n_classes])],
        initializer=inits,
    )
    proto = helper.make_model(
        graph,
        producer_name="edge-module/tools/train_models.py",
        producer_version="1",
        opset_imports=[helper.make_opsetid("", OPSET)],
    )
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto)
    return proto


def write(name: str, proto: onnx.ModelProto, descriptor: dict[str, Any], out: Path) -> str:
    data = proto.SerializeToString()
    (out / f"{name}.onnx").write_bytes(data)
    (out / f"{name}.json").write_text(json.dumps(descriptor, indent=2) + "\n")
    return hashlib.sha256(data).hexdigest()


def train_digits(out: Path) -> float:
    x_train, x_test, y_train, y_test = digits_split()
    model = MLPClassifier(hidden_layer_sizes=(128,), alpha=1e-3, max_iter=600, random_state=0)
    model.fit(x_train, y_train)
    accuracy = float(model.score(x_test, y_test))
    if accuracy < DIGITS_MIN_ACCURACY:
        raise SystemExit(f"digits accuracy {accuracy:.3f} is below {DIGITS_MIN_ACCURACY}")
    proto = mlp_graph(model, "image", ["N", 1, 8, 8])
    descriptor = {
        "name": "digits",
        "version": "1.0.0",
        "description": "Handwritten digit classifier (scikit-learn digits, 8x8 grey).",
        "input": {
            "name": "image",
            "kind": "image",
            "layout": "NCHW",
            "width": 8,
            "height": 8,
            "channels": 1,
            "scale": 1 / 255,
            "mean": [0.0],
            "std": [1.0],
            "swapRB": False,
        },
        "output": {"name": "probabilities", "kind": "probabilities"},
        "labels": [str(i) for i in range(10)],
        "metering": {"meterName": "digits.image.classify", "apiType": "image-classification"},
        "heldOutAccuracy": round(accuracy, 4),
    }
    write("digits", proto, descriptor, out)
    return accuracy


def train_telemetry(out: Path) -> float:
    x, y = telemetry_dataset()
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    model = MLPClassifier(hidden_layer_sizes=(32,), alpha=1e-3, max_iter=800, random_state=0)
    model.fit((x_train - mean) / std, y_train)
    accuracy = float(model.score((x_test - mean) / std, y_test))
    proto = mlp_graph(model, "vector", ["N", len(TELEMETRY_FEATURES)], mean, std)
    descriptor = {
        "name": "telemetry",
        "version": "1.0.0",
        "description": "Centrifugal pump state from eight sensor readings.",
        "input": {"name": "vector", "kind": "tensor", "shape": [len(TELEMETRY_FEATURES)]},
        "features": TELEMETRY_FEATURES,
        "output": {"name": "probabilities", "kind": "probabilities"},
        "labels": TELEMETRY_LABELS,
        "metering": {"meterName": "telemetry.vector.classify", "apiType": "anomaly-detection"},
        "heldOutAccuracy": round(accuracy, 4),
    }
    write("telemetry", proto, descriptor, out)
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with threadpool_limits(1):
        digits = train_digits(args.out)
        telemetry = train_telemetry(args.out)
    print(f"digits: held-out accuracy {digits:.4f}")
    print(f"telemetry: held-out accuracy {telemetry:.4f}")


if __name__ == "__main__":
    main()
