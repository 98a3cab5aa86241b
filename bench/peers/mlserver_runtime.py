"""An MLServer 1.7 runtime running an ONNX model with onnxruntime (MLServer ships none).

Loaded by MLServer by import path (``mlserver_runtime.OnnxRuntime``) in the
process that ``mlserver_launcher.py`` starts and in MLServer's inference-pool
worker (its default ``parallel_workers=1``), where ``predict`` runs on the
worker's event loop; batches come from MLServer's adaptive batcher. Outputs
carry no codec parameters (see ``predict``). Runs in the
peers' mlserver venv only; never imported by the harness.
"""

# mypy: allow-subclassing-any
from __future__ import annotations

from importlib import import_module
from typing import Any

import onnxruntime as ort

# Imported by name: MLServer lives in the peer's venv, not in the module's (mypy).
MLModel: Any = import_module("mlserver").MLModel
NumpyCodec = import_module("mlserver.codecs").NumpyCodec
InferenceResponse = import_module("mlserver.types").InferenceResponse


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        self._session = ort.InferenceSession(self.settings.parameters.uri,
                                             providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        return True

    async def predict(self, payload: Any) -> Any:
        batch = NumpyCodec.decode_input(payload.inputs[0])
        (result,) = self._session.run([self._output], {self._input: batch})
        output = NumpyCodec.encode_output(self._output, result)
        # The codec tags the output with parameters {"content_type": "np"}; Triton's
        # HTTP client (perf_analyzer) then expects "binary_data_size" in them and fails.
        output.parameters = None
        return InferenceResponse(model_name=self.name, id=payload.id, outputs=[output])
