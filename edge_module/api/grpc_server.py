"""The Open Inference Protocol v2 over gRPC (``inference.GRPCInferenceService``, KServe's
``grpc_predict_v2.proto`` in ``grpc_v2/``), on ``Grpc:Port`` when ``Grpc:Enabled``.

The same model checks, payload conversion (``v2_tensors.py``) and the same one pipeline as
the HTTP API: a ``ModelInfer`` call becomes a :class:`GrpcInbound` offered without blocking
(a full intake answers ``UNAVAILABLE`` at once), batched with MQTT and HTTP inputs, gated,
metered and answered; the answer's tensors go back as ``raw_output_contents``. Errors carry
the module's code in the status message (``"<Code>: <message>"``) and in the trailing
metadata ``edge-module-code`` (and ``retry-after`` when known). ``Http:ApiKey`` is checked
on every call but ``ServerLive``/``ServerReady`` (metadata ``authorization: Bearer <key>``
or ``x-api-key``); ``Http:Tls`` gives TLS and, with ``ClientCaFile``, mutual TLS.

Threads: grpcio's own poller threads and ``Grpc:Threads`` handler threads
(``grpc-<n>``), each waiting for its call's answer; at most ``Grpc:MaxConcurrentCalls``
calls are in progress, one more is refused with ``RESOURCE_EXHAUSTED``.
"""

from __future__ import annotations

import concurrent.futures
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import grpc

from edge_module import __version__
from edge_module.api.grpc_v2 import grpc_predict_v2_pb2 as pb
from edge_module.api.grpc_v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from edge_module.api.router import HttpError
from edge_module.api.v2 import (
    CLAIMED_GRACE_SECONDS,
    SERVER_NAME,
    ModelRepository,
    Offer,
    StatsBook,
)
from edge_module.api.v2_tensors import (
    TRITON_TYPES,
    datatype_of,
    metadata,
    model_config,
    named_payload,
    result_tensors,
    tensor_payload,
    to_bytes,
)
from edge_module.config import GrpcSettings, HttpTlsSettings
from edge_module.errors import ErrorCode, info
from edge_module.inference.catalog import Catalog, ModelState
from edge_module.inference.models import Model
from edge_module.logs import get_logger
from edge_module.transport.http import Answer, GrpcInbound

log = get_logger("grpc")

STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
          403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
          405: grpc.StatusCode.UNIMPLEMENTED, 408: grpc.StatusCode.DEADLINE_EXCEEDED,
          413: grpc.StatusCode.RESOURCE_EXHAUSTED, 501: grpc.StatusCode.UNIMPLEMENTED,
          503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
            "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
            "UINT16": "uint_contents", "UINT32": "uint_contents",
            "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
            "BYTES": "bytes_contents"}


class CallError(Exception):
    """A coded refusal, answered as a gRPC status."""

    def __init__(self, code: ErrorCode, message: str,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra or {}

    @classmethod
    def of(cls, exc: HttpError) -> CallError:
        body = json.loads(exc.response.body)["error"]
        return cls(ErrorCode(body["code"]), body["message"])


def _abort(context: grpc.ServicerContext, error: CallError) -> None:
    status = STATUS.get(info(error.code).http_status, grpc.StatusCode.INTERNAL)
    trailing = [("edge-module-code", error.code.value)]
    retry = error.extra.get("retryAfter")
    if isinstance(retry, (int, float)):
        trailing.append(("retry-after", str(max(1, round(retry)))))
    elif info(error.code).retryable:
        trailing.append(("retry-after", "1"))
    if error.extra.get("status"):
        trailing.append(("edge-module-status", str(error.extra["status"])))
    context.set_trailing_metadata(tuple(trailing))
    context.abort(status, f"{error.code.value}: {error.message}")


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, catalog: Catalog, offer: Offer, ready: Callable[[], tuple[bool, str]],
                 accepting: Callable[[], bool], answer_timeout: float,
                 api_key: bytes | None, max_batch: Callable[[], int] = lambda: 1,
                 stats: StatsBook | None = None) -> None:
        self.catalog = catalog
        self.stats = stats if stats is not None else StatsBook()
        self.max_batch = max_batch
        self.offer = offer
        self.ready = ready
        self.accepting = accepting
        self.answer_timeout = answer_timeout
        self.api_key = api_key

    def _authorised(self, context: grpc.ServicerContext) -> None:
        if self.api_key is None:
            return
        meta = {k.lower(): v for k, v in context.invocation_metadata()
                if isinstance(v, str)}
        sent = meta.get("x-api-key", "")
        auth = meta.get("authorization", "")
        if not sent and auth[:7].lower() == "bearer ":
            sent = auth[7:].strip()
        if not hmac.compare_digest(sent.encode("utf-8", "replace"), self.api_key):
            raise CallError(ErrorCode.UNAUTHORIZED, "this call needs the module's API key")

    def _model(self, name: str, version: str) -> Model:
        model = self.catalog.resolve(name, version or None)
        if model is None:
            which = f"{name!r} version {version!r}" if version else repr(name)
            raise CallError(ErrorCode.UNKNOWN_MODEL, f"no ready model {which}")
        return model

    def _guarded(self, context: grpc.ServicerContext, call: Callable[[], Any],
                 open_call: bool = False) -> Any:
        try:
            if not open_call:
                self._authorised(context)
            return call()
        except HttpError as exc:
            _abort(context, CallError.of(exc))
        except CallError as exc:
            _abort(context, exc)
        return None  # unreachable: abort raises

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.ready()[0])

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._guarded(context, lambda: pb.ServerMetadataResponse(
            name=SERVER_NAME, version=__version__, extensions=["binary_tensor_data"]))

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        def ready() -> Any:
            return pb.ModelReadyResponse(
                ready=self.catalog.resolve(request.name, request.version or None) is not None)
        return self._guarded(context, ready)

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        def meta() -> Any:
            model = self._model(request.name, request.version)
            versions = [v.version for v in self.catalog.versions()
                        if v.name == model.provenance.name and v.state == ModelState.READY]
            doc = metadata(model, versions)
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=doc["name"], versions=doc["versions"], platform=doc["platform"],
                inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"])
                        for t in doc["inputs"]],
                outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"])
                         for t in doc["outputs"]])
        return self._guarded(context, meta)

    def ModelConfig(self, request: Any, context: grpc.ServicerContext) -> Any:
        def config() -> Any:
            doc = model_config(self._model(request.name, request.version), self.max_batch())
            return pb.ModelConfigResponse(config=pb.ModelConfig(
                name=doc["name"], platform=doc["platform"], backend=doc["backend"],
                max_batch_size=doc["max_batch_size"],
                input=[pb.ModelConfig.Input(name=t["name"], dims=t["dims"],
                                            data_type=TRITON_TYPES[t["data_type"][5:]
                                                                   .replace("STRING", "BYTES")])
                       for t in doc["input"]],
                output=[pb.ModelConfig.Output(name=t["name"], dims=t["dims"],
                                              data_type=TRITON_TYPES[t["data_type"][5:]
                                                                     .replace("STRING", "BYTES")])
                        for t in doc["output"]]))
        return self._guarded(context, config)

    def ModelStatistics(self, request: Any, context: grpc.ServicerContext) -> Any:
        def stats() -> Any:
            if request.name:
                p = self._model(request.name, request.version).provenance
                keys = [(p.name, p.version)]
            else:
                keys = [(v.name, v.version) for v in self.catalog.versions()]
            out = []
            for name, version in keys:
                doc = self.stats.as_dict(name, version)
                durations = {k: pb.StatisticDuration(count=v["count"], ns=v["ns"])
                             for k, v in doc["inference_stats"].items()}
                out.append(pb.ModelStatistics(
                    name=name, version=version, last_inference=doc["last_inference"],
                    inference_count=doc["inference_count"],
                    execution_count=doc["execution_count"],
                    inference_stats=pb.InferStatistics(**durations)))
            return pb.ModelStatisticsResponse(model_stats=out)
        return self._guarded(context, stats)

    def _repository(self) -> ModelRepository:
        if not isinstance(self.catalog, ModelRepository):
            raise CallError(ErrorCode.REPOSITORY_UNSUPPORTED, "this module serves one fixed "
                            "model; it has no model repository")
        return self.catalog

    def RepositoryIndex(self, request: Any, context: grpc.ServicerContext) -> Any:
        def index() -> Any:
            entry = pb.RepositoryIndexResponse.ModelIndex
            return pb.RepositoryIndexResponse(models=[
                entry(name=v.name, version=v.version, state=v.state.value.upper(),
                      reason=v.reason or "") for v in self._repository().index()
                if not request.ready or v.state == ModelState.READY])
        return self._guarded(context, index)

    def RepositoryModelLoad(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._guarded(context, lambda: self._change(request.model_name, True))

    def RepositoryModelUnload(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._guarded(context, lambda: self._change(request.model_name, False))

    def _change(self, name: str, load: bool) -> Any:
        repository = self._repository()
        try:
            (repository.load if load else repository.unload)(name)
        except Exception as exc:  # the repository's own errors: answered, never INTERNAL
            raise CallError(ErrorCode.MODEL_LOAD_FAILED,
                            f"{'load' if load else 'unload'} of {name!r} failed: {exc}"
                            ) from None
        return pb.RepositoryModelLoadResponse() if load else pb.RepositoryModelUnloadResponse()

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        started = time.perf_counter_ns()
        model = self.catalog.resolve(request.model_name, request.model_version or None)
        try:
            return self._guarded(context, lambda: self._infer(request, context, started))
        except Exception:
            if model is not None:
                p = model.provenance
                self.stats.failed((p.name, p.version), time.perf_counter_ns() - started)
            raise

    def _infer(self, request: Any, context: grpc.ServicerContext, started: int) -> Any:
        model = self._model(request.model_name, request.model_version)
        if not self.accepting():
            raise CallError(ErrorCode.SHUTTING_DOWN, "the module is stopping")
        names = model.descriptor.input_names()
        if len(request.inputs) != 1 and not model.named_inputs:
            raise CallError(ErrorCode.INVALID_REQUEST, "send exactly one input "
                            f"{names[0]!r} (the model takes one)")
        if request.raw_input_contents and \
                len(request.raw_input_contents) != len(request.inputs):
            raise CallError(ErrorCode.INVALID_REQUEST, "raw_input_contents must hold one "
                            "entry per input")
        sent: list[tuple[dict[str, Any], Any]] = []
        for i, tensor in enumerate(request.inputs):
            if request.raw_input_contents:
                data: Any = request.raw_input_contents[i]
            else:
                field = CONTENTS.get(tensor.datatype)
                if field is None:
                    raise CallError(ErrorCode.TENSOR_DTYPE_INVALID,
                                    f"datatype {tensor.datatype!r} is not supported")
                data = list(getattr(tensor.contents, field))
            sent.append(({"name": tensor.name, "datatype": tensor.datatype,
                          "shape": list(tensor.shape)}, data))
        if model.named_inputs:
            payload = named_payload(sent, model)
        else:
            spec, data = sent[0]
            payload = tensor_payload(spec["name"], spec["datatype"], spec["shape"], data, model)
        wanted = [o.name for o in request.outputs]
        reply: concurrent.futures.Future[Answer] = concurrent.futures.Future()
        inbound = GrpcInbound(payload, "grpc", correlation_id=request.id or None,
                              model=model.provenance.name,
                              version=request.model_version or None, reply=reply)
        if not self.offer(inbound):
            raise CallError(ErrorCode.OVERLOADED, "the intake queue is full "
                            "(Pipeline:IntakeQueue)")
        # a client that cancels or whose deadline passes is billed nothing not yet claimed
        context.add_callback(inbound.abandon)
        try:
            answer = reply.result(timeout=min(self.answer_timeout,
                                              context.time_remaining() or self.answer_timeout))
        except concurrent.futures.TimeoutError:
            if inbound.abandon():
                raise CallError(ErrorCode.ANSWER_TIMEOUT, "no answer within "
                                f"{self.answer_timeout:g} s (Http:AnswerTimeoutSeconds)"
                                ) from None
            answer = reply.result(timeout=CLAIMED_GRACE_SECONDS)  # billed: moments away
        envelope = json.loads(answer.body)
        if not answer.ok:
            error = dict(envelope.get("error") or {})
            try:
                code = ErrorCode(str(error.get("code")))
            except ValueError:
                code = ErrorCode.INTERNAL
            raise CallError(code, str(error.get("message", "")), error)
        tensors = result_tensors(envelope, model)
        names = wanted or list(tensors)
        unknown = [n for n in names if n not in tensors]
        if unknown:
            raise CallError(ErrorCode.INVALID_REQUEST, f"unknown outputs {unknown}; the "
                            f"model answers {', '.join(tensors)}")
        provenance = envelope.get("model") or {}
        out = pb.ModelInferResponse.InferOutputTensor
        shaping = time.perf_counter_ns()
        response = pb.ModelInferResponse(
            model_name=provenance.get("name", model.provenance.name),
            model_version=provenance.get("version", model.provenance.version),
            id=request.id,
            outputs=[out(name=n, datatype=datatype_of(tensors[n]),
                         shape=list(tensors[n].shape)) for n in names],
            raw_output_contents=[to_bytes(tensors[n]) for n in names])
        done = time.perf_counter_ns()
        p = model.provenance
        self.stats.answered((p.name, p.version), done - started, envelope, done - shaping)
        return response


class GrpcServer:
    """Binds at construction (``port`` is the bound one); ``start``/``stop``."""

    def __init__(self, settings: GrpcSettings, tls: HttpTlsSettings,
                 service: InferenceService, max_message_bytes: int) -> None:
        self.server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(settings.threads, thread_name_prefix="grpc"),
            maximum_concurrent_rpcs=settings.max_concurrent_calls,
            options=[("grpc.max_receive_message_length", max_message_bytes),
                     ("grpc.max_send_message_length", 64 * 1024 * 1024)])
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            service, self.server)
        address = f"{settings.host}:{settings.port}"
        if tls.cert_file is not None and tls.key_file is not None:
            credentials = grpc.ssl_server_credentials(
                [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
                root_certificates=tls.client_ca_file.read_bytes()
                if tls.client_ca_file is not None else None,
                require_client_auth=tls.client_ca_file is not None)
            self.port = self.server.add_secure_port(address, credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")

    def start(self) -> None:
        self.server.start()
        log.info("grpc_listening", port=self.port)

    def stop(self, grace: float = 2.0) -> None:
        self.server.stop(grace).wait(grace + 1)
