"""An MLServer 1.7 runtime running an ONNX model with onnxruntime (MLServer ships none).

Loaded by MLServer by import path (``mlserver_runtime.OnnxRuntime``) in the
process that ``mlserver_launcher.py`` starts and in MLServer's inference-pool
worker (its default ``parallel_workers=1``), where ``predict`` runs on the
worker's event loop; batches come from MLServer's adaptive batcher. Outputs
carry no codec parameters (see ``predict``). Runs in the
peers' mlserver venv only; never imported by the harness.
"""

# mypy: ignore-missing-imports, allow-subclassing-any, allow-untyped-calls
from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        self._session = ort.InferenceSession(self.settings.parameters.uri,
                                             providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        batch = NumpyCodec.decode_input(payload.inputs[0])
        (result,) = self._session.run([self._output], {self._input: batch})
        output = NumpyCodec.encode_output(self._output, result)
        # The codec tags the output with parameters {"content_type": "np"}; Triton's
        # HTTP client (perf_analyzer) then expects "binary_data_size" in them and fails.
        output.parameters = None
        return InferenceResponse(model_name=self.name, id=payload.id, outputs=[output])
