"""The HTTP API's API key and TLS / mutual TLS, against the module process with real clients.

With ``Http:ApiKey`` set, inference and control routes refuse a request without the key (401
``Unauthorized``) and accept it as a bearer token or ``X-Api-Key``; health and readiness stay
open; the key appears nowhere in the log, ``/status`` or ``/metrics``. With ``Http:Tls`` the
API speaks only TLS (Triton's client over HTTPS included), and with ``ClientCaFile`` a client
without a certificate is refused during the handshake.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as th

from simulator.certs import make_client_cert, make_server_cert
from tests.support import Module, wait_until

KEY = "http-api-key-5b7e9c1d2a4f6e8b"
TENSOR = json.dumps({"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                 "data": [0.25] * 64}]}).encode()


def call(url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, body, headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_api_key_guards_inference_and_control_but_not_health(
    start_module: Callable[..., Module],
) -> None:
    module = start_module(f"Http:ApiKey={KEY}")
    base = f"http://127.0.0.1:{module.http_port}"
    for path in ("/health", "/ready", "/v2/health/live", "/v2/health/ready", "/metrics"):
        assert call(base + path)[0] == 200, path
    for path in ("/v2", "/v2/models/digits", "/status", "/v2/models/digits/stats"):
        status, body = call(base + path)
        assert status == 401, path
        assert json.loads(body)["code" if path.startswith("/v2") else "error"]
    status, body = call(base + "/v2/models/digits/infer", TENSOR)
    assert status == 401 and json.loads(body)["code"] == "Unauthorized"
    wrong = call(base + "/v2/models/digits/infer", TENSOR, {"X-Api-Key": KEY[:-1] + "x"})
    assert wrong[0] == 401
    assert call(base + "/v2/models/digits/infer", TENSOR,
                {"Authorization": f"Bearer {KEY}"})[0] == 200
    assert call(base + "/v2/models/digits/infer", TENSOR, {"X-Api-Key": KEY})[0] == 200
    assert call(base + "/status", None, {"X-Api-Key": KEY})[0] == 200
    triton = th.InferenceServerClient(f"127.0.0.1:{module.http_port}")
    assert triton.is_server_ready()  # open
    meta = triton.get_model_metadata("digits", headers={"Authorization": f"Bearer {KEY}"})
    assert meta["name"] == "digits"
    # the key is nowhere the operator or a scraper can read it
    metrics = call(base + "/metrics")[1].decode()
    status_body = call(base + "/status", None, {"X-Api-Key": KEY})[1].decode()
    assert KEY not in metrics and KEY not in status_body
    assert KEY not in module.log_text()


def _wait_tls_ready(module: Module, url: str, context: ssl.SSLContext) -> None:
    def ready() -> bool:
        if module.exited() is not None:
            raise AssertionError(f"module exited:\n{module.log_tail()}")
        try:
            return call(url, context=context)[0] == 200
        except (OSError, urllib.error.URLError):
            return False
    wait_until(ready, 30, f"module ready over TLS; log:\n{module.log_tail()}")


def test_tls_and_mutual_tls_refuse_a_client_without_a_certificate(
    start_module: Callable[..., Module], tmp_path: Path,
) -> None:
    server = make_server_cert(tmp_path / "server", ["127.0.0.1"])
    clients = make_client_cert(tmp_path / "client")
    module = start_module(f"Http:Tls:CertFile={server.cert}", f"Http:Tls:KeyFile={server.key}",
                          f"Http:Tls:ClientCaFile={clients.ca}", wait_ready=False)
    base = f"https://127.0.0.1:{module.http_port}"
    with_cert = ssl.create_default_context(cafile=str(server.ca))
    with_cert.load_cert_chain(str(clients.cert), str(clients.key))
    _wait_tls_ready(module, base + "/v2/health/ready", with_cert)
    status, body = call(base + "/v2/models/digits/infer", TENSOR, context=with_cert)
    assert status == 200 and json.loads(body)["outputs"]
    # no client certificate: refused in the handshake, before any HTTP
    without = ssl.create_default_context(cafile=str(server.ca))
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionResetError)):
        call(base + "/health", context=without)
    # plain HTTP on the TLS port gets no answer
    with pytest.raises((urllib.error.URLError, ConnectionResetError, OSError)):
        status, _ = call(f"http://127.0.0.1:{module.http_port}/health")
        assert status != 200
    # Triton's client over HTTPS with its certificate
    triton = th.InferenceServerClient(
        f"127.0.0.1:{module.http_port}", ssl=True,
        ssl_options={"ca_certs": str(server.ca), "certfile": str(clients.cert),
                     "keyfile": str(clients.key)})
    tensor = th.InferInput("image", [1, 1, 8, 8], "FP32")
    tensor.set_data_from_numpy(np.full((1, 1, 8, 8), 0.25, dtype=np.float32))
    labels = triton.infer("digits", [tensor]).as_numpy("label")
    assert labels is not None and labels.shape == (1,)
