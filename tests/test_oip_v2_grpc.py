"""OIP v2 over gRPC with Triton's own gRPC client against the module process.

Health, server and model metadata, inference with typed contents and raw binary contents
(images as BYTES, float tensors), the documented status codes (NOT_FOUND, INVALID_ARGUMENT,
PERMISSION_DENIED for an unlicensed module, UNAUTHENTICATED without the API key), and one
usage record per answered call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tg
from tritonclient.utils import InferenceServerException

from simulator.billing import BillingSimulator, KeyInfo
from simulator.broker import free_port
from simulator.certs import make_client_cert, make_server_cert
from simulator.datasets import digits_split
from tests.support import Module, digit_png, wait_until

FAST_DRAIN = ("Metering:MaxDelaySeconds=0.2", "Metering:MaxBackoffSeconds=1",
              "Metering:TimeoutSeconds=2")


def grpc_module(start: Callable[..., Module], *extra: str, **kwargs: object
                ) -> tuple[Module, tg.InferenceServerClient]:
    port = free_port()
    module = start("Grpc:Enabled=true", f"Grpc:Port={port}", *extra, **kwargs)
    return module, tg.InferenceServerClient(f"127.0.0.1:{port}")


def tensor_input(rows: np.ndarray) -> tg.InferInput:
    tensor = tg.InferInput("image", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows.astype(np.float32))
    return tensor


def test_grpc_metadata_and_inference_are_metered_like_mqtt(
    start_module: Callable[..., Module], billing: BillingSimulator,
) -> None:
    _, triton = grpc_module(start_module, *FAST_DRAIN)
    _, x_test, _, y_test = digits_split()
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.get_server_metadata().name == "edge-module"
    assert triton.is_model_ready("digits") and not triton.is_model_ready("nope")
    meta = triton.get_model_metadata("digits")
    assert meta.name == "digits" and [i.datatype for i in meta.inputs] == ["BYTES"]
    assert [o.name for o in meta.outputs] == ["label", "score", "result"]
    config = triton.get_model_config("digits").config  # Triton's own message parses ours
    assert config.name == "digits" and config.max_batch_size >= 1
    assert [(i.name, i.data_type) for i in config.input] == [("image", 13)]  # TYPE_STRING
    # images as BYTES in raw contents
    files = np.array([digit_png(x_test[i]) for i in range(4)], dtype=np.object_)
    images = tg.InferInput("image", [4], "BYTES")
    images.set_data_from_numpy(files)
    labels = triton.infer("digits", [images]).as_numpy("label")
    assert labels is not None
    assert sum(int(a) == b for a, b in zip(labels, y_test[:4], strict=True)) >= 3
    # a float tensor, with a version
    result = triton.infer("digits", [tensor_input(x_test[:3].reshape(3, 1, 8, 8) / 16)],
                          model_version="1.0.0",
                          outputs=[tg.InferRequestedOutput("score")])
    scores = result.as_numpy("score")
    assert scores is not None and scores.shape == (3,)
    wait_until(lambda: int(billing.totals()["records"]) == 2, 20, "2 records billed")
    assert sorted(r["meter"]["quantity"] for r in billing.store.records()) == [3, 4]
    with pytest.raises(InferenceServerException) as unknown:
        triton.infer("nope", [tensor_input(np.zeros((1, 1, 8, 8)))])
    assert unknown.value.status() == "StatusCode.NOT_FOUND"
    assert "UnknownModel" in str(unknown.value)
    with pytest.raises(InferenceServerException) as shape:
        triton.infer("digits", [tensor_input(np.zeros((1, 1, 8, 7)))])
    assert shape.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "TensorShapeMismatch" in str(shape.value)
    time.sleep(0.5)
    assert int(billing.totals()["records"]) == 2  # failures are not billed
    stats = triton.get_inference_statistics("digits").model_stats[0]
    assert stats.name == "digits" and stats.inference_count == 7
    assert stats.inference_stats.success.count == 2
    assert stats.inference_stats.fail.count == 1  # the bad shape (the unknown model: no key)
    with pytest.raises(InferenceServerException) as no_repository:
        triton.get_model_repository_index()
    assert no_repository.value.status() == "StatusCode.UNIMPLEMENTED"
    assert "RepositoryUnsupported" in str(no_repository.value)
    with pytest.raises(InferenceServerException):
        triton.load_model("digits")


def test_grpc_unlicensed_and_api_key_refusals(
    start_module: Callable[..., Module], billing: BillingSimulator,
) -> None:
    revoked = "revoked-key-0123456789"
    billing.state.keys[revoked] = KeyInfo("edge-module", revoked=True)
    key = "grpc-api-key-0123456789abcdef"
    module, triton = grpc_module(start_module, f"Http:ApiKey={key}", "Http:MaxBodyBytes=4096",
                                 api_key=revoked, wait_ready=False)
    module.wait_serving_or_gated()
    wait_until(triton.is_server_live, 10, "gRPC live")  # open without the key
    with pytest.raises(InferenceServerException) as anonymous:
        triton.get_model_metadata("digits")
    assert anonymous.value.status() == "StatusCode.UNAUTHENTICATED"
    headers = {"authorization": f"Bearer {key}"}
    assert triton.get_model_metadata("digits", headers=headers).name == "digits"
    with pytest.raises(InferenceServerException) as gated:
        triton.infer("digits", [tensor_input(np.zeros((1, 1, 8, 8)))], headers=headers)
    assert gated.value.status() == "StatusCode.PERMISSION_DENIED"
    assert "Unlicensed" in str(gated.value)
    with pytest.raises(InferenceServerException) as large:  # over Http:MaxBodyBytes
        triton.infer("digits", [tensor_input(np.zeros((20, 1, 8, 8)))], headers=headers)
    assert large.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert key not in module.log_text()


def test_grpc_mutual_tls_refuses_a_client_without_a_certificate(
    start_module: Callable[..., Module], tmp_path: Path,
) -> None:
    server = make_server_cert(tmp_path / "server", ["127.0.0.1"])
    clients = make_client_cert(tmp_path / "client")
    port = free_port()
    module = start_module("Grpc:Enabled=true", f"Grpc:Port={port}",
                          f"Http:Tls:CertFile={server.cert}", f"Http:Tls:KeyFile={server.key}",
                          f"Http:Tls:ClientCaFile={clients.ca}", wait_ready=False)
    trusted = tg.InferenceServerClient(
        f"127.0.0.1:{port}", ssl=True, root_certificates=str(server.ca),
        private_key=str(clients.key), certificate_chain=str(clients.cert))

    def live() -> bool:
        if module.exited() is not None:
            raise AssertionError(module.log_tail())
        try:
            return bool(trusted.is_server_live())
        except InferenceServerException:
            return False
    wait_until(live, 30, "gRPC over mTLS live")
    labels = trusted.infer("digits", [tensor_input(np.zeros((1, 1, 8, 8)))]).as_numpy("label")
    assert labels is not None and labels.shape == (1,)
    anonymous = tg.InferenceServerClient(f"127.0.0.1:{port}", ssl=True,
                                         root_certificates=str(server.ca))
    with pytest.raises(InferenceServerException) as refused:
        anonymous.is_server_live(client_timeout=5)
    assert refused.value.status() in ("StatusCode.UNAVAILABLE",
                                      "StatusCode.DEADLINE_EXCEEDED"), refused.value
    plain = tg.InferenceServerClient(f"127.0.0.1:{port}")
    with pytest.raises(InferenceServerException):
        plain.is_server_live(client_timeout=5)
