"""The OIP v2 repository extension against a catalog that can load and unload (the protocol
``api/v2.py`` defines for the model repository), served by the real HTTP server in-process.

Index lists every version with its state; load/unload change what ``ready`` and ``infer``
see; a failed load is a coded 400 ``ModelLoadFailed`` (never a 500); server metadata names
the ``model_repository`` extension.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest

from edge_module.api.http import HttpApi
from edge_module.api.v2 import ModelRepository, V2Api
from edge_module.config import HttpSettings, ModelSettings
from edge_module.exceptions import ModelError
from edge_module.inference.catalog import ModelState, SingleModel, VersionInfo
from edge_module.inference.models import Model, load_model


class Repository(SingleModel):
    """One real model that can be unloaded and loaded again; other names fail to load."""

    def __init__(self, model: Model) -> None:
        super().__init__(model)
        self.loaded = True

    def resolve(self, name: str | None, version: str | None) -> Model | None:
        return super().resolve(name, version) if self.loaded else None

    def load(self, name: str) -> None:
        if name != self.model.provenance.name:
            raise ModelError(f"no model folder {name!r} in the repository")
        self.loaded = True

    def unload(self, name: str) -> None:
        if name != self.model.provenance.name:
            raise ModelError(f"{name!r} is not loaded")
        self.loaded = False

    def index(self) -> list[VersionInfo]:
        p = self.model.provenance
        state = ModelState.READY if self.loaded else ModelState.UNLOADED
        return [VersionInfo(p.name, p.version, state, None if self.loaded else "unloaded")]


@pytest.fixture
def api() -> Iterator[HttpApi]:
    http = HttpApi(HttpSettings.model_validate({"Host": "127.0.0.1", "Port": 0}),
                   lambda: b"", lambda: (True, "serving"))
    repository = Repository(load_model(ModelSettings.model_validate({"Name": "digits"})))
    assert isinstance(repository, ModelRepository)
    V2Api(http, repository, lambda _: False, lambda: (True, "serving"), lambda: True, 5.0)
    http.start()
    yield http
    http.stop()


@pytest.fixture
def server(api: HttpApi) -> str:
    return f"http://127.0.0.1:{api.port}"


def call(url: str, body: bytes | None = None) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body), timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_index_load_and_unload_change_what_is_served(server: str) -> None:
    status, meta = call(server + "/v2")
    assert status == 200 and "model_repository" in meta["extensions"]  # type: ignore[index]
    assert call(server + "/v2/repository/index", b"{}") == (200, [
        {"name": "digits", "version": "1.0.0", "state": "READY", "reason": ""}])
    assert call(server + "/v2/models/digits/ready")[0] == 200
    assert call(server + "/v2/repository/models/digits/unload", b"{}") == (200, {})
    assert call(server + "/v2/models/digits/ready")[0] == 404
    status, refused = call(server + "/v2/models/digits/infer", b'{"inputs": []}')
    assert status == 404 and refused["code"] == "UnknownModel"  # type: ignore[index]
    _, index = call(server + "/v2/repository/index", b"{}")
    assert index[0]["state"] == "UNLOADED"  # type: ignore[index]
    assert call(server + "/v2/repository/models/digits/load", b"{}") == (200, {})
    assert call(server + "/v2/models/digits/ready")[0] == 200
    status, failed = call(server + "/v2/repository/models/ghost/load", b"{}")
    assert status == 400 and failed["code"] == "ModelLoadFailed"  # type: ignore[index]
    assert "ghost" in failed["error"]  # type: ignore[index]


def test_a_full_intake_is_503_without_waiting(server: str) -> None:
    # the offer here always finds the intake full: the answer comes at once, coded
    body = json.dumps({"inputs": [{"name": "image", "shape": [1, 1, 8, 8],
                                   "datatype": "FP32", "data": [0.0] * 64}]}).encode()
    status, refused = call(server + "/v2/models/digits/infer", body)
    assert status == 503 and refused["code"] == "Overloaded"  # type: ignore[index]


def test_openapi_and_swagger_describe_exactly_the_routes_served(
    api: HttpApi, server: str,
) -> None:
    status, document = call(server + "/openapi.json")
    assert status == 200 and isinstance(document, dict)
    served = {(r.method.lower(), r.pattern) for r in api.router.routes()}
    described = {(method, path) for path, operations in document["paths"].items()
                 for method in operations}
    assert described == served
    assert ("post", "/v2/models/{name}/versions/{version}/infer") in described
    params = document["paths"]["/v2/models/{name}/versions/{version}/infer"]["post"]
    assert [p["name"] for p in params["parameters"]] == ["name", "version"]
    with urllib.request.urlopen(server + "/swagger", timeout=10) as page:
        assert page.headers["content-type"].startswith("text/html")
        text = page.read().decode()
    assert "<script" not in text and "http" not in text.replace("/openapi.json", "")
    for _, path in served:
        assert f"<code>{path}</code>" in text, path


def test_the_repository_extension_over_grpc() -> None:
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    from edge_module.api.grpc_server import GrpcServer, InferenceService
    from edge_module.config import GrpcSettings, HttpTlsSettings

    repository = Repository(load_model(ModelSettings.model_validate({"Name": "digits"})))
    service = InferenceService(repository, lambda _: False, lambda: (True, "serving"),
                               lambda: True, 5.0, None)
    server = GrpcServer(GrpcSettings.model_validate({"Host": "127.0.0.1", "Port": 0}),
                        HttpTlsSettings(), service, 1 << 20)
    server.start()
    try:
        triton = tg.InferenceServerClient(f"127.0.0.1:{server.port}")
        index = triton.get_model_repository_index().models
        assert [(m.name, m.version, m.state) for m in index] == [("digits", "1.0.0", "READY")]
        triton.unload_model("digits")
        assert not triton.is_model_ready("digits")
        assert triton.get_model_repository_index().models[0].state == "UNLOADED"
        triton.load_model("digits")
        assert triton.is_model_ready("digits")
        with pytest.raises(InferenceServerException) as failed:
            triton.load_model("ghost")
        assert failed.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "ModelLoadFailed" in str(failed.value) and "ghost" in str(failed.value)
        with pytest.raises(InferenceServerException) as full:  # the intake is always full
            tensor = tg.InferInput("image", [1, 1, 8, 8], "FP32")
            tensor.set_data_from_numpy(np.zeros((1, 1, 8, 8), dtype=np.float32))
            triton.infer("digits", [tensor])
        assert full.value.status() == "StatusCode.UNAVAILABLE"
        assert "Overloaded" in str(full.value)
    finally:
        server.stop(0.5)
