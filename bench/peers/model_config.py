"""The Triton model configuration that perf_analyzer asks every server for.

perf_analyzer reads ``GET /v2/models/{m}/config`` (HTTP) or the
``inference.GRPCInferenceService/ModelConfig`` RPC (gRPC) before it sends load
(max_batch_size, inputs, outputs). Triton serves both; KServe and MLServer serve
neither, so their launchers serve these two answers from files this module
writes: ``model-config.json`` and ``model-config.pb`` (a serialized
``ModelConfigResponse``). The protobuf is encoded by hand (field numbers from
Triton's model_config.proto / grpc_service.proto) so neither the harness nor the
peers' venvs need Triton's generated classes. Runs on the harness's main thread.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TYPE_FP32 = 11  # inference.DataType


def config(model: str, max_batch: int, inputs: list[tuple[str, list[int]]],
           outputs: list[tuple[str, list[int]]], backend: str) -> dict[str, Any]:
    """The JSON shape of Triton's ``ModelConfig`` (FP32 tensors; dims without the batch)."""
    return {"name": model, "platform": "", "backend": backend, "max_batch_size": max_batch,
            "input": [{"name": n, "data_type": "TYPE_FP32", "dims": d} for n, d in inputs],
            "output": [{"name": n, "data_type": "TYPE_FP32", "dims": d} for n, d in outputs]}


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 as two's complement, like protobuf
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field(number: int, payload: bytes | int | str) -> bytes:
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    raw = payload.encode() if isinstance(payload, str) else payload
    return _varint(number << 3 | 2) + _varint(len(raw)) + raw


def _packed(number: int, values: list[int]) -> bytes:
    return _field(number, b"".join(_varint(v) for v in values))


def response_bytes(cfg: dict[str, Any]) -> bytes:
    """``ModelConfigResponse{config: ModelConfig}`` in protobuf wire format."""
    body = _field(1, cfg["name"]) + _field(17, cfg["backend"]) + _field(4, cfg["max_batch_size"])
    for tensor in cfg["input"]:   # ModelInput: name 1, data_type 2, dims 4
        body += _field(5, _field(1, tensor["name"]) + _field(2, TYPE_FP32)
                       + _packed(4, tensor["dims"]))
    for tensor in cfg["output"]:  # ModelOutput: name 1, data_type 2, dims 3
        body += _field(6, _field(1, tensor["name"]) + _field(2, TYPE_FP32)
                       + _packed(3, tensor["dims"]))
    return _field(1, body)


def write(cfg: dict[str, Any], directory: Path) -> tuple[Path, Path]:
    js, pb = directory / "model-config.json", directory / "model-config.pb"
    js.write_text(json.dumps(cfg))
    pb.write_bytes(response_bytes(cfg))
    return js, pb
