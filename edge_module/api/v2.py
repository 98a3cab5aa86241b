"""The Open Inference Protocol v2 (KServe v2 / Triton) over the module's HTTP server.

Routes (docs/oip-v2.md): ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``,
``/v2/models/{name}[/versions/{version}]`` (metadata), ``.../ready``, ``POST .../infer``
(JSON tensors and Triton's binary tensor data extension), ``.../stats`` and
``/v2/models/stats`` (Triton's statistics extension), and the repository extension
(``POST /v2/repository/index``, ``/v2/repository/models/{name}/load``, ``/unload``)
when the catalog is a :class:`ModelRepository`; otherwise those answer 501.

An infer request is checked here (model known, one input, shape and type), turned into a
payload the module's codec reads (``v2_tensors.py``) and offered, without blocking, to the
one pipeline as an :class:`HttpInbound`: it is batched with MQTT inputs, gated by the
licence, metered and answered like them. A full intake answers 503 ``Overloaded`` with
``Retry-After`` at once; the answer is awaited up to ``Http:AnswerTimeoutSeconds``.

Threads: handlers run on the HTTP event loop thread (``http``; an infer body with over
64 KiB of JSON or over 4 MiB in all is parsed on a worker thread so the loop stays
responsive), except repository
load/unload, which may block and run in the handler pool. Statistics (``StatsBook``) are
shared with the gRPC API under a lock.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol, runtime_checkable

from edge_module import __version__
from edge_module.api.http import HttpApi
from edge_module.api.router import HttpError, Request, Response
from edge_module.api.v2_tensors import (
    HEADER_LENGTH,
    answer,
    metadata,
    model_config,
    parse_infer,
)
from edge_module.errors import ErrorCode, info
from edge_module.inference.catalog import Catalog, ModelState, VersionInfo
from edge_module.inference.models import Model
from edge_module.logs import get_logger
from edge_module.transport.base import Inbound
from edge_module.transport.http import Answer, HttpInbound

log = get_logger("http")
SERVER_NAME = "edge-module"
OVERLOAD_RETRY_SECONDS = 1
PARSE_ON_LOOP_BYTES = 64 * 1024  # larger JSON is parsed on a worker thread
COPY_ON_LOOP_BYTES = 4 * 1024 * 1024  # larger binary tensors are copied on a worker thread
CLAIMED_GRACE_SECONDS = 30.0  # an answer already billed is awaited this much longer


@runtime_checkable
class ModelRepository(Protocol):
    """What the repository extension needs from a catalog that can load and unload.

    ``load``/``unload`` may block (they run in the handler pool) and raise on failure
    (the message is answered as ``ModelLoadFailed``)."""

    def load(self, name: str) -> None: ...

    def unload(self, name: str) -> None: ...

    def index(self) -> list[VersionInfo]: ...


class Offer(Protocol):
    def __call__(self, inbound: Inbound) -> bool:
        """Queue ``inbound`` without blocking; False when the intake is full."""


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class ModelStats:
    """Triton's per-model statistics, from what this API saw (loop thread only)."""

    last_inference: int = 0  # ms since the epoch
    inference_count: int = 0  # items answered
    execution_count: int = 0  # requests answered
    success: _Duration = field(default_factory=_Duration)
    fail: _Duration = field(default_factory=_Duration)
    queue: _Duration = field(default_factory=_Duration)
    compute_input: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    compute_output: _Duration = field(default_factory=_Duration)

    def as_dict(self, name: str, version: str) -> dict[str, Any]:
        zero = {"count": 0, "ns": 0}
        return {"name": name, "version": version, "last_inference": self.last_inference,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {
                    "success": self.success.as_dict(), "fail": self.fail.as_dict(),
                    "queue": self.queue.as_dict(),
                    "compute_input": self.compute_input.as_dict(),
                    "compute_infer": self.compute_infer.as_dict(),
                    "compute_output": self.compute_output.as_dict(),
                    "cache_hit": zero, "cache_miss": zero},
                "batch_stats": []}


class StatsBook:
    """Every model's statistics, kept by the HTTP and gRPC APIs alike (any thread: a lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[tuple[str, str], ModelStats] = {}

    def failed(self, key: tuple[str, str], ns: int) -> None:
        with self._lock:
            self._models.setdefault(key, ModelStats()).fail.add(ns)

    def answered(self, key: tuple[str, str], ns: int, envelope: dict[str, Any],
                 output_ns: int) -> None:
        """One answered request: its time, and the envelope's decode/infer/queue times."""
        timing = envelope.get("timingMs") or {}
        with self._lock:
            stats = self._models.setdefault(key, ModelStats())
            stats.success.add(ns)
            for slot, part in ((stats.compute_input, "decode"),
                               (stats.compute_infer, "infer")):
                if isinstance(timing.get(part), (int, float)):
                    slot.add(int(timing[part] * 1e6))
            if isinstance(timing.get("total"), (int, float)):
                spent = timing["total"] - timing.get("decode", 0) - timing.get("infer", 0)
                stats.queue.add(max(0, int(spent * 1e6)))
            stats.compute_output.add(output_ns)
            stats.inference_count += len(envelope.get("results") or ())
            stats.execution_count += 1
            stats.last_inference = int(time.time() * 1000)

    def as_dict(self, name: str, version: str) -> dict[str, Any]:
        with self._lock:
            return self._models.get((name, version), ModelStats()).as_dict(name, version)


def _parse_on_loop(request: Request) -> bool:
    """Whether parsing ``request`` is cheap enough for the loop thread: at most 64 KiB of
    JSON, and binary tensors (copied once, never parsed) up to 4 MiB. A hop to a worker
    thread costs more than that copy (measured: ~8% of the module's samples at
    concurrency 16 with 600 KB binary tensors)."""
    size = len(request.body)
    raw = request.headers.get(HEADER_LENGTH, "")
    json_part = int(raw) if raw.isascii() and raw.isdigit() and int(raw) <= size else size
    return json_part <= PARSE_ON_LOOP_BYTES and size <= COPY_ON_LOOP_BYTES


def _unknown(name: str, version: str | None) -> HttpError:
    which = f"{name!r} version {version!r}" if version else repr(name)
    return HttpError(404, ErrorCode.UNKNOWN_MODEL, f"no ready model {which}",
                     info(ErrorCode.UNKNOWN_MODEL).fix)


def error_response(envelope: dict[str, Any]) -> Response:
    """The HTTP answer to a pipeline error envelope: the code's status, body and headers."""
    error = dict(envelope.get("error") or {})
    try:
        code = ErrorCode(str(error.get("code")))
    except ValueError:
        code = ErrorCode.INTERNAL
    item = info(code)
    error.setdefault("fix", item.fix)
    headers: dict[str, str] = {}
    retry = error.get("retryAfter")
    if isinstance(retry, (int, float)) and retry >= 0:
        headers["Retry-After"] = str(max(1, round(retry)))
    elif item.retryable:
        headers["Retry-After"] = str(OVERLOAD_RETRY_SECONDS)
    return Response.json(item.http_status, {"id": envelope.get("id"), "error": error}, headers)


class V2Api:
    """Registers the v2 routes on ``http``; models come from ``catalog``."""

    def __init__(self, http: HttpApi, catalog: Catalog, offer: Offer,
                 ready: Callable[[], tuple[bool, str]], accepting: Callable[[], bool],
                 answer_timeout: float, max_batch: Callable[[], int] = lambda: 1,
                 stats: StatsBook | None = None) -> None:
        self.catalog = catalog
        self.max_batch = max_batch
        self.offer = offer
        self.ready = ready
        self.accepting = accepting
        self.answer_timeout = answer_timeout
        self.stats = stats if stats is not None else StatsBook()
        live = Response.json(200, {"live": True})
        http.route("GET", "/v2/health/live", lambda _: live, protected=False)
        http.route("GET", "/v2/health/ready", self._server_ready, protected=False)
        http.route("GET", "/v2", self._server_metadata)
        http.route("GET", "/v2/models/stats", self._all_stats)
        for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            http.route("GET", base, self._model_metadata)
            http.route("GET", base + "/ready", self._model_ready)
            http.route("GET", base + "/stats", self._model_stats)
            http.route("GET", base + "/config", self._model_config)
            http.route("POST", base + "/infer", self._infer)
        http.route("POST", "/v2/repository/index", self._index)
        http.route("POST", "/v2/repository/models/{name}/load", self._load)
        http.route("POST", "/v2/repository/models/{name}/unload", self._unload)

    # -- server and models -------------------------------------------------

    async def _server_ready(self, _: Request) -> Response:
        ready, reason = self.ready()
        return Response.json(200 if ready else 503, {"ready": ready, "reason": reason})

    async def _server_metadata(self, _: Request) -> Response:
        extensions = ["binary_tensor_data", "statistics"]
        if isinstance(self.catalog, ModelRepository):
            extensions.append("model_repository")
        return Response.json(200, {"name": SERVER_NAME, "version": __version__,
                                   "extensions": extensions})

    def _model(self, request: Request) -> Model:
        name = request.params["name"]
        version = request.params.get("version")
        model = self.catalog.resolve(name, version)
        if model is None:
            raise _unknown(name, version)
        return model

    async def _model_metadata(self, request: Request) -> Response:
        model = self._model(request)
        versions = [v.version for v in self.catalog.versions()
                    if v.name == model.provenance.name and v.state == ModelState.READY]
        return Response.json(200, metadata(model, versions))

    async def _model_config(self, request: Request) -> Response:
        """Triton's model configuration (what perf_analyzer reads)."""
        return Response.json(200, model_config(self._model(request), self.max_batch()))

    async def _model_ready(self, request: Request) -> Response:
        model = self._model(request)
        return Response.json(200, {"name": model.provenance.name,
                                   "version": model.provenance.version, "ready": True})

    async def _model_stats(self, request: Request) -> Response:
        model = self._model(request)
        p = model.provenance
        return Response.json(200, {"model_stats": [self.stats.as_dict(p.name, p.version)]})

    async def _all_stats(self, _: Request) -> Response:
        return Response.json(200, {"model_stats": [
            self.stats.as_dict(v.name, v.version) for v in self.catalog.versions()]})

    # -- inference ----------------------------------------------------------

    async def _infer(self, request: Request) -> Response:
        started = time.perf_counter_ns()
        model = self._model(request)
        key = (model.provenance.name, model.provenance.version)
        try:
            return await self._infer_model(request, model, key, started)
        except HttpError:
            self.stats.failed(key, time.perf_counter_ns() - started)
            raise

    async def _infer_model(self, request: Request, model: Model, key: tuple[str, str],
                           started: int) -> Response:
        if not self.accepting():
            raise HttpError(503, ErrorCode.SHUTTING_DOWN, "the module is stopping",
                            info(ErrorCode.SHUTTING_DOWN).fix, {"Retry-After": "1"})
        if _parse_on_loop(request):
            parsed = parse_infer(request.body, request.headers, model)
        else:  # keep the loop (and /health) responsive
            parsed = await asyncio.to_thread(parse_infer, request.body, request.headers, model)
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Answer] = loop.create_future()
        inbound = HttpInbound(parsed.payload, "http", correlation_id=parsed.id,
                              content_type=request.header("content-type") or None,
                              model=model.provenance.name,
                              version=request.params.get("version"), loop=loop, reply=reply)
        if not self.offer(inbound):
            raise HttpError(503, ErrorCode.OVERLOADED, "the intake queue is full "
                            "(Pipeline:IntakeQueue)", info(ErrorCode.OVERLOADED).fix,
                            {"Retry-After": str(OVERLOAD_RETRY_SECONDS)})
        try:
            result = await asyncio.wait_for(asyncio.shield(reply), self.answer_timeout)
        except asyncio.CancelledError:  # the client went away: bill nothing not yet claimed
            inbound.abandon()
            raise
        except TimeoutError:
            if not inbound.abandon():  # already billed: its answer is moments away
                result = await asyncio.wait_for(reply, CLAIMED_GRACE_SECONDS)
            else:
                self._timed_out(model)
        envelope = json.loads(result.body)
        if not result.ok:
            self.stats.failed(key, time.perf_counter_ns() - started)
            return error_response(envelope)
        shaping = time.perf_counter_ns()
        body, headers, content_type = answer(envelope, model, parsed)
        done = time.perf_counter_ns()
        self.stats.answered(key, done - started, envelope, done - shaping)
        return Response(200, body, content_type, headers)

    def _timed_out(self, model: Model) -> NoReturn:
        log.warning("http_answer_timeout", model=model.provenance.name,
                    timeout_s=self.answer_timeout, effect="answered 504 and not billed",
                    fix="the module is saturated: send less, or raise "
                    "Http:AnswerTimeoutSeconds")
        raise HttpError(504, ErrorCode.ANSWER_TIMEOUT, "no answer within "
                        f"{self.answer_timeout:g} s (Http:AnswerTimeoutSeconds)",
                        info(ErrorCode.ANSWER_TIMEOUT).fix,
                        {"Retry-After": str(OVERLOAD_RETRY_SECONDS)})

    # -- repository extension ------------------------------------------------

    def _repository(self) -> ModelRepository:
        if not isinstance(self.catalog, ModelRepository):
            raise HttpError(501, ErrorCode.REPOSITORY_UNSUPPORTED,
                            "this module serves one fixed model; it has no model repository",
                            info(ErrorCode.REPOSITORY_UNSUPPORTED).fix)
        return self.catalog

    def _index(self, _: Request) -> Response:
        repository = self._repository()
        return Response.json(200, [
            {"name": v.name, "version": v.version, "state": v.state.value.upper(),
             "reason": v.reason or ""} for v in repository.index()])

    def _load(self, request: Request) -> Response:
        return self._change(request, load=True)

    def _unload(self, request: Request) -> Response:
        return self._change(request, load=False)

    def _change(self, request: Request, load: bool) -> Response:
        repository = self._repository()
        name = request.params["name"]
        try:
            (repository.load if load else repository.unload)(name)
        except Exception as exc:  # the repository's own errors: answered, never a 500
            log.warning("model_load_failed" if load else "model_unload_failed", model=name,
                        error=f"{type(exc).__name__}: {exc}",
                        fix="fix the model files the error names, then load again")
            raise HttpError(400, ErrorCode.MODEL_LOAD_FAILED,
                            f"{'load' if load else 'unload'} of {name!r} failed: {exc}",
                            info(ErrorCode.MODEL_LOAD_FAILED).fix) from None
        return Response.json(200, {})
