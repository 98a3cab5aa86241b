"""The pipeline: intake queue -> decode -> batch -> gate -> infer -> meter -> publish.

Threads and queues (docs/architecture.md draws them):

* the transport's thread calls ``submit``, which blocks while the bounded
  intake queue is full: back-pressure reaches the broker, nothing is dropped;
* ``DecodeWorkers`` threads decode payloads (OpenCV releases the GIL) and
  answer bad ones at once with an error envelope;
* one inference thread gathers decoded requests into a batch (up to
  ``MaxBatchSize`` items, waiting at most ``MaxQueueDelayMs`` after the first,
  like Triton's dynamic batcher; one model version per batch, the others'
  requests held for their own next batch; for a model with dynamic input sizes,
  only items of equal shapes share a batch), asks the gate and the meter
  whether it may serve, and runs the model once (when the model fails on a batch,
  the batch is split in halves, recursively, so one request's values, such as a token
  id past the table, cost only that request an ``InferenceFailed``: about 2 log2 N
  extra runs find it, at most ``MaxRerunsPerFailedBatch``, and none once a model's
  failed batches pass ``MaxFailedBatchesPerMinute``: then the whole batch is answered
  ``InferenceFailed``, so that poisoned inputs cannot multiply the runs of everyone's);
* decoded requests waiting for inference are counted in bytes: one that would take
  the total past ``MaxQueuedMb`` is answered ``Overloaded`` (retryable, unbilled)
  instead of queued, and a batch's tensors are let go once it is inferred;
* one commit thread takes every inferred batch waiting, commits their usage
  records in one transaction (group commit), and only then publishes the
  results, so the commit's fsync overlaps the next batch's inference.

Invariant (durable before visible): no result leaves the module before the
metering record of its transaction is committed. ``Meter.commit`` returns only
when the records are durable; if it fails, the results are not sent and the
requests get a ``MeteringUnavailable`` error instead.

Invariant (billed once): a repeat (a redelivery, or a named request sent again with the
same bytes) is answered again without a second record, also when it arrives while the
first copy is still between admission and commit: ``InFlight`` marks such copies and
their commit, which follows the first copy's, looks the ledger up again.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np

from edge_module.activity import Activity
from edge_module.config import PipelineSettings
from edge_module.envelope import error_envelope, result_envelope
from edge_module.errors import ErrorCode
from edge_module.exceptions import EdgeModuleError, Refusal
from edge_module.inference.catalog import Catalog, CatalogEvents, SingleModel
from edge_module.inference.codecs import (
    Codec,
    Limits,
    RequestError,
    is_json,
    parse_json,
    requested_model,
)
from edge_module.inference.heads import Answering, Frame
from edge_module.inference.models import Item, Model
from edge_module.inflight import Held, InFlight
from edge_module.logs import get_logger
from edge_module.metering.records import MeterSpec, Usage
from edge_module.metrics import Metrics
from edge_module.supervisor import Spawn, start_thread
from edge_module.transport.base import Inbound, Transport

log = get_logger("pipeline")


class Meter(Protocol):
    """Where usage goes. ``commit`` must return only once the records are durable."""

    def admit(self, wanted: int) -> int:
        """How many of ``wanted`` new transactions can be recorded now (0 when full)."""

    def release(self, count: int) -> None:
        """Give back admitted room for transactions that failed before being recorded."""

    def buffer_full(self) -> Refusal:
        """The refusal sent for transactions that were not admitted."""

    def commit(self, spec: MeterSpec, usages: Sequence[Usage]) -> list[str]:
        """Durably record one transaction per usage under ``spec``; return the record ids."""

    def replayed(self, key: str, digest: bytes, within_ms: int | None = None) -> str | None:
        """The record of an earlier answer to this same delivery (at most ``within_ms``
        old, when given), if any."""

    def replayed_many(self, deliveries: Sequence[tuple[str, bytes]],
                      within_ms: int | None = None) -> dict[tuple[str, bytes], str]:
        """``replayed`` for several deliveries at once: those answered before."""


class Gate(Protocol):
    """The licensing decision, taken once before inference."""

    def gate_check(self) -> None:
        """Raise Refusal when the module may not serve now."""


class OpenGate:
    def gate_check(self) -> None:
        return None


class NoMeter:
    """For tools and benchmarks that measure the pipeline without metering."""

    def admit(self, wanted: int) -> int:
        return wanted

    def release(self, count: int) -> None:
        return None

    def buffer_full(self) -> Refusal:
        return Refusal(ErrorCode.METERING_BUFFER_FULL, "unreachable: this meter never fills")

    def commit(self, spec: MeterSpec, usages: Sequence[Usage]) -> list[str]:
        return ["" for _ in usages]

    def replayed(self, key: str, digest: bytes, within_ms: int | None = None) -> str | None:
        return None

    def replayed_many(self, deliveries: Sequence[tuple[str, bytes]],
                      within_ms: int | None = None) -> dict[tuple[str, bytes], str]:
        return {}


@dataclass(frozen=True)
class Serving:
    """What answers a request: the model and how its answers are shaped and billed.

    Swapped as one object (``Pipeline.reconfigure``), so that every request is
    decoded, inferred, billed and answered by the same model and settings, even
    while the module is being reconfigured live.
    """

    model: Model
    codec: Codec
    top_k: int
    score_threshold: float
    max_batch: int
    quantity_per_item: int
    meter: MeterSpec


@dataclass
class Inferred:
    """A batch that went through the model, waiting for its group commit."""

    serving: Serving
    jobs: list[Job]
    fresh: list[Job]  # the jobs that need a usage record (not replays)
    outputs: dict[str, np.ndarray]  # the head's outputs by name, the batch's items first
    infer_ms: float


@dataclass
class Job:
    inbound: Inbound
    request_id: str
    items: Sequence[Item]
    frames: list[Frame | None]
    decode_ms: float
    serving: Serving
    # The items' shapes when the model has dynamic sizes: only equal keys share a batch.
    shape_key: tuple[tuple[int, ...], ...] | None = None
    tensors: str = "json"  # a tensor model's answer form: "json" lists or "npy"
    replay_of: str | None = None  # record id when this answers a redelivered input again
    # "id:<hash of source and request id>" when the client named the request (the
    # payload's "id", MQTT v5 correlation data, an edgeHub correlation id): the same name
    # with the same bytes is the same request, however the transport delivered it again.
    client_key: str | None = None
    _digest: bytes | None = None
    _delivery_key: str | None = None
    # The in-flight copy this job holds (``Pipeline._flights``; None once left), and
    # whether another copy of it was (or may have been) held when this one was admitted:
    # then its commit looks the ledger up again.
    flight: Held | None = None
    copy_in_flight: bool = False
    answered: bool = False  # set by the commit thread once it answered (or dropped) this job
    # Inference thread: ``admitted`` while the job holds room in the meter that nothing
    # else gives back; ``handed`` once it was answered or handed to the commit thread
    # (from then on the inference thread neither answers nor releases it).
    admitted: bool = False
    handed: bool = False
    count: int = 0  # how many items: ``items`` is emptied once the job is inferred
    nbytes: int = 0  # its decoded tensors' bytes, counted against ``MaxQueuedMb``

    def __post_init__(self) -> None:
        self.count = len(self.items)

    @property
    def repeatable(self) -> bool:
        """Whether a repeat of this input is answered without a new record: the client
        named it, or the transport says it was delivered before."""
        return self.client_key is not None or self.inbound.redelivered

    @property
    def replay_key(self) -> str | None:
        """What a repeat of this input is recognised by in the ledger (with ``digest``).

        A transport's delivery key (an MQTT packet id) is scoped by the input's source and
        the model version serving it: the same packet id and bytes sent to another topic
        or model is other work, never a repeat of the first (hashed: the ledger keeps no
        topic of the customer's)."""
        if self.client_key is not None:
            return self.client_key
        if self.inbound.delivery_key is None:
            return None
        if self._delivery_key is None:
            model = self.serving.model.provenance
            self._delivery_key = "d:" + hashlib.blake2b(
                f"{self.inbound.source}\0{model.name}\0{model.version}\0"
                f"{self.inbound.delivery_key}".encode(), digest_size=16).hexdigest()
        return self._delivery_key

    def digest(self) -> bytes:
        if self._digest is None:
            self._digest = hashlib.blake2b(self.inbound.payload, digest_size=16).digest()
        return self._digest


_STOP: Any = object()
SAME_COMMIT = "same commit"  # ``replay_of`` of a copy billed with another in one commit


class Pipeline:
    def __init__(
        self,
        model: Model | Catalog,
        settings: PipelineSettings,
        transport: Transport,
        metrics: Metrics,
        meter: Meter,
        gate: Gate | None = None,
        top_k: int = 3,
        score_threshold: float = 0.0,
    ) -> None:
        self.settings = settings
        self.transport = transport
        self.metrics = metrics
        self.meter = meter
        self.gate = gate or OpenGate()
        self.activity = Activity()  # recent answers, latencies and errors (status page)
        # Which model answers which input: one model (``SingleModel``) or a repository.
        self.catalog: Catalog = SingleModel(model) if isinstance(model, Model) else model
        self._shape_settings = (top_k, score_threshold)
        # One ``Serving`` per model version, made when an input first needs it; a batch
        # holds one ``Serving``, so two models (or versions) never share a batch.
        self._servings: dict[Model, Serving] = {}
        self._servings_lock = threading.Lock()
        events = getattr(self.catalog, "events", None)
        if isinstance(events, CatalogEvents):  # a version retired: let its session go
            events.changed.append(self._forget_servings)
        self.intake: queue.Queue[Inbound] = queue.Queue(maxsize=settings.intake_queue)
        # Decoded requests hold full float tensors: two batches waiting keep inference fed;
        # more would only hold memory (256 decoded 224x224 images are ~150 MB).
        self.batches: queue.Queue[Job] = queue.Queue(maxsize=max(4, 2 * settings.max_batch_size))
        # Inferred batches waiting for their commit: bounded, so a slow disk slows
        # inference down instead of piling results up in memory.
        self.commits: queue.Queue[Inferred] = queue.Queue(maxsize=8)
        self._threads: list[threading.Thread] = []
        self._accepting = True
        self._repeat_window_ms = int(settings.repeat_window_seconds * 1000)
        self._flights = InFlight()
        # Decoded tensors waiting for inference, in bytes (decode workers add, the
        # inference thread takes away once a batch is served).
        self._queued_bytes = 0
        self._queued_lock = threading.Lock()
        self._max_queued_bytes = settings.max_queued_mb * 1024 * 1024
        # Per model version: when its recent failed batches were (``_may_rerun``), and
        # the versions whose failed batches are answered whole for now.
        self._failed_batches: dict[tuple[str, str], deque[float]] = {}
        self._reruns_suspended: set[tuple[str, str]] = set()

    def _serving(self, model: Model, top_k: int, score_threshold: float) -> Serving:
        settings = self.settings
        metering = model.descriptor.metering
        return Serving(
            model=model,
            codec=Codec(model, Limits(settings.max_payload_bytes, settings.max_batch_items,
                                     settings.max_image_pixels, settings.max_tensor_elements)),
            top_k=top_k,
            score_threshold=score_threshold,
            max_batch=min(settings.max_batch_size,
                          model.descriptor.maxBatch or settings.max_batch_size,
                          model.batch_limit or settings.max_batch_size),
            quantity_per_item=metering.quantityPerItem,
            meter=MeterSpec(metering.meterName, metering.apiType),
        )

    def serving_for(self, model: Model) -> Serving:
        """The one ``Serving`` of this model version under the current answer shape."""
        with self._servings_lock:
            serving = self._servings.get(model)
            if serving is None:
                if len(self._servings) >= 64:  # versions retired since: forget them
                    self._servings.clear()
                serving = self._servings[model] = self._serving(model, *self._shape_settings)
            return serving

    def _forget_servings(self) -> None:
        """Drop the cached ``Serving`` objects (and so the models they hold) when the
        catalog changes; batches in flight keep theirs, new inputs get new ones."""
        with self._servings_lock:
            self._servings.clear()

    @property
    def serving(self) -> Serving:
        """The default model's ``Serving``."""
        return self.serving_for(self.catalog.default)

    @property
    def model(self) -> Model:
        return self.catalog.default

    def reconfigure(self, model: Model | None = None, top_k: int | None = None,
                    score_threshold: float | None = None) -> None:
        """Serve new requests with another model (a single-model module) or answer shape;
        requests already decoded finish with what they started with."""
        top_k = self._shape_settings[0] if top_k is None else top_k
        score_threshold = self._shape_settings[1] if score_threshold is None \
            else score_threshold
        with self._servings_lock:
            if (top_k, score_threshold) != self._shape_settings:
                self._shape_settings = (top_k, score_threshold)
                self._servings.clear()
            if model is not None and isinstance(self.catalog, SingleModel) and \
                    model is not self.catalog.model:
                self.catalog = SingleModel(model)

    # -- lifecycle --------------------------------------------------------

    def start(self, spawn: Spawn = start_thread) -> None:
        """Start the workers; ``spawn`` is the supervisor's when the app runs them."""
        for i in range(self.settings.decode_workers):
            self._threads.append(spawn(f"decode-{i}", self._decode_loop))
        self._threads.append(spawn("infer", self._infer_loop))
        self._threads.append(spawn("commit", self._commit_loop))

    def submit(self, inbound: Inbound) -> None:
        """Called by the transport for every input; blocks while the intake is full."""
        self.metrics.messages_in.inc()
        self.intake.put(inbound)
        self.metrics.intake_depth.set(self.intake.qsize())

    def offer(self, inbound: Inbound) -> bool:
        """Like ``submit`` without blocking (for event-loop transports): False when full."""
        try:
            self.intake.put_nowait(inbound)
        except queue.Full:
            return False
        self.metrics.messages_in.inc()
        self.metrics.intake_depth.set(self.intake.qsize())
        return True

    def idle(self) -> bool:
        return (self.intake.unfinished_tasks == 0 and self.batches.unfinished_tasks == 0
                and self.commits.unfinished_tasks == 0)

    def drain(self, timeout: float) -> bool:
        """Wait until every accepted input has been answered; False on timeout."""
        deadline = time.monotonic() + timeout
        while not self.idle():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def stop(self) -> None:
        for _ in range(self.settings.decode_workers):
            try:  # a wedged worker must not hold the shutdown: the threads are daemons
                self.intake.put(_STOP, timeout=2)
            except queue.Full:
                log.warning("pipeline_stop_intake_full", effect="a worker did not finish; "
                            "the process exits anyway and the broker redelivers its inputs")
                break
        for thread in self._threads:
            thread.join(timeout=5)

    # -- decode -----------------------------------------------------------

    def _decode_loop(self) -> None:
        while True:
            inbound = self.intake.get()
            if inbound is _STOP:
                self.intake.task_done()
                self.batches.put(cast(Job, _STOP))
                return
            try:
                self._decode(inbound)
            except Exception as exc:  # a bug must not kill the worker or lose the message
                log.exception("decode_crashed", error=str(exc))
                self._send_error(inbound, inbound.correlation_id or uuid.uuid4().hex,
                                 ErrorCode.INTERNAL, "internal error while decoding; see logs")
            finally:
                self.intake.task_done()
                self.metrics.intake_depth.set(self.intake.qsize())

    def _decode(self, inbound: Inbound) -> None:
        start = time.perf_counter()
        try:
            serving, body = self._route(inbound)
            decoded = serving.codec.decode(inbound.payload, body)
        except RequestError as exc:
            request_id = exc.request_id or inbound.correlation_id or uuid.uuid4().hex
            self._send_error(inbound, request_id, exc.code, exc.message)
            return
        elapsed = time.perf_counter() - start
        self.metrics.decode_seconds.observe(elapsed)
        named = decoded.request_id or inbound.correlation_id
        request_id = named or uuid.uuid4().hex
        client_key = None
        if named:  # hashed: the ledger keeps no topic or id of the customer's
            client_key = "id:" + hashlib.blake2b(
                f"{inbound.source}\0{named}".encode(), digest_size=16).hexdigest()
        job = Job(inbound, request_id, decoded.items, decoded.frames, elapsed * 1000,
                  serving, decoded.shape_key, decoded.tensors, client_key=client_key,
                  nbytes=_nbytes(decoded.items))
        if not self._queue_bytes(job):
            self._send_error(inbound, request_id, ErrorCode.OVERLOADED,
                             "too many decoded inputs are waiting for inference "
                             f"(Pipeline:MaxQueuedMb={self.settings.max_queued_mb}); "
                             "send it again later", serving)
            return
        self.batches.put(job)
        self.metrics.batch_depth.set(self.batches.qsize())

    def _queue_bytes(self, job: Job) -> bool:
        """Count ``job``'s tensors as waiting; False (nothing counted) when they would take
        the total past ``MaxQueuedMb``. A job alone is always taken, however large (the
        codec's limits bound it), so that every legal input can be served."""
        with self._queued_lock:
            if self._queued_bytes and \
                    self._queued_bytes + job.nbytes > self._max_queued_bytes:
                return False
            self._queued_bytes += job.nbytes
            return True

    def _unqueue(self, jobs: Iterable[Job]) -> None:
        """``jobs`` were served: their tensors no longer wait, and are let go (a batch
        waiting for its commit keeps its outputs, not its inputs)."""
        with self._queued_lock:
            for job in jobs:
                self._queued_bytes -= job.nbytes
                job.nbytes = 0
                job.items = ()

    def _route(self, inbound: Inbound) -> tuple[Serving, dict[str, Any] | None]:
        """The ``Serving`` that answers this input (its JSON object too, when it is one
        and names a model, parsed once); ``UnknownModel`` when no ready model fits."""
        name, version = inbound.model, inbound.version
        body = None
        payload = inbound.payload
        if 0 < len(payload) <= self.settings.max_payload_bytes and is_json(payload):
            body = parse_json(payload)
            field_name, field_version = requested_model(body)
            if field_name is not None:
                name, version = field_name, field_version
            elif field_version is not None:
                version = field_version
        model = self.catalog.resolve(name, version)
        if model is None:
            raise RequestError(
                ErrorCode.UNKNOWN_MODEL,
                f"no ready model {name or '(default)'}"
                + (f" version {version}" if version else "")
                + "; /status lists the models, versions and their states",
                _named_id(body))
        return self.serving_for(model), body

    # -- batch, infer, meter, publish -------------------------------------

    def _infer_loop(self) -> None:
        stops = 0
        # Jobs taken from the queue for a later batch: another model's (each model version
        # batches on its own, like Triton's per-model queues), or past a full batch. Served
        # in arrival order per model; at most ``hold`` of them, so memory stays bounded.
        waiting: deque[Job] = deque()
        hold = 2 * self.settings.max_batch_size
        delay = self.settings.max_queue_delay_ms / 1000
        while True:
            first = waiting.popleft() if waiting else self.batches.get()
            if first is _STOP:
                self.batches.task_done()
                stops += 1
                if stops == self.settings.decode_workers:
                    self.commits.put(cast(Inferred, _STOP))
                    return
                continue
            jobs = [first]
            count = first.count
            max_items = first.serving.max_batch
            full = False
            held: deque[Job] = deque()
            for job in waiting:  # the same model's jobs already taken join this batch
                if not full and job is not _STOP and _batchable(job, first):
                    if count + job.count <= max_items:
                        jobs.append(job)
                        count += job.count
                        continue
                    full = True
                held.append(job)
            waiting = held
            deadline = time.perf_counter() + delay
            while not full and count < max_items and len(waiting) < hold:
                remaining = deadline - time.perf_counter()
                try:
                    job = self.batches.get(timeout=remaining) if remaining > 0 else \
                        self.batches.get_nowait()
                except queue.Empty:
                    break
                if job is _STOP:
                    waiting.append(job)
                    break
                if not _batchable(job, first):
                    waiting.append(job)  # another model's (or shape's): its own batch
                    continue
                if count + job.count > max_items:
                    waiting.append(job)
                    break
                jobs.append(job)
                count += job.count
            try:
                self._serve(jobs)
            except Exception as exc:  # never lose a batch to a bug: answer every job
                log.exception("batch_crashed", error=str(exc))
                self._crashed([job for job in jobs if not job.handed])
            finally:
                self._unqueue(jobs)
                for _ in jobs:
                    self.batches.task_done()
                self.metrics.batch_depth.set(self.batches.qsize())

    def _crashed(self, rest: list[Job]) -> None:
        """A bug stopped a batch: the jobs not yet answered or handed to the commit thread
        (``rest``) give back their admitted room and in-flight entries and are answered
        InternalError; the others are already on their way and are left alone."""
        self._release(rest)
        self._leave_flights(rest)
        for job in rest:
            job.handed = True
            try:
                self._send_error(job.inbound, job.request_id, ErrorCode.INTERNAL,
                                 "internal error while serving; see logs", job.serving)
            except Exception as exc:  # the next job still gets its answer
                log.error("error_not_sent", id=job.request_id,
                          error=f"{type(exc).__name__}: {exc}", effect="the input stays "
                          "unacknowledged, so the broker delivers it again")

    def _serve(self, jobs: list[Job]) -> None:
        # A repeat is answered again and not billed again: a transport redelivery (MQTT's
        # DUP flag, edgeHub message ids), or a request the client named before with the
        # same bytes (QoS 1 is at-least-once: a broker that dies before acknowledging a
        # publish gets it again from the sender and forwards it as a new message).
        # A copy arriving while another is held (admitted, not yet committed: this batch
        # or one before it) is marked; its commit, which comes after the other's, looks
        # the ledger up again (``_bill_once``). Entering before the look-up below closes
        # the gap: a copy that finds no other held finds the other's record instead.
        for job in jobs:
            self._enter_flight(job)
        # One look-up per batch for each kind: the transport says it was delivered
        # before (no time limit), or only the name says so (a repeat within the window).
        redelivered = [job for job in jobs if job.replay_key is not None and
                       job.repeatable and job.inbound.redelivered]
        named = [job for job in jobs if job.replay_key is not None and
                 job.repeatable and not job.inbound.redelivered]
        for group, window in ((redelivered, None), (named, self._repeat_window_ms)):
            if group:
                answered = self.meter.replayed_many(
                    [(str(job.replay_key), job.digest()) for job in group], window)
                for job in group:
                    job.replay_of = answered.get((str(job.replay_key), job.digest()))
        fresh = [job for job in jobs if job.replay_of is None]
        refused: list[tuple[Job, Refusal]] = []
        if fresh:
            try:
                self.gate.gate_check()
            except Refusal as gate_refusal:
                refused = [(job, gate_refusal) for job in fresh]
            else:
                allowed = self.meter.admit(len(fresh))
                for job in fresh[:allowed]:
                    job.admitted = True
                if allowed < len(fresh):
                    full = self.meter.buffer_full()
                    refused = [(job, full) for job in fresh[allowed:]]
        if refused:
            self._leave_flights(job for job, _ in refused)
            for job, reason in refused:
                self._send_error(job.inbound, job.request_id, reason.code, reason.message,
                                 job.serving, **reason.details)
                job.handed = True
            jobs = [job for job in jobs if not job.handed]
            if not jobs:
                return
        started = time.perf_counter()
        for job in jobs:
            self.metrics.queue_seconds.observe(started - job.inbound.received)
        serving = jobs[0].serving
        try:
            outputs = self._infer(serving, [item for job in jobs for item in job.items])
        except Exception as exc:  # onnxruntime raises untyped errors
            if len(jobs) == 1:
                self._inference_failed(jobs, f"the model failed on this input: {exc}")
                return
            self._isolate(serving, jobs, exc, started)
            return
        infer_ms = (time.perf_counter() - started) * 1000
        self._hand_off(Inferred(serving, jobs, [j for j in jobs if j.admitted], outputs,
                                infer_ms))

    def _hand_off(self, inferred: Inferred) -> None:
        """Queue an inferred batch for its commit; its jobs' admitted room goes with it."""
        self.commits.put(inferred)
        for job in inferred.jobs:
            job.handed = True
            job.admitted = False

    def _isolate(self, serving: Serving, jobs: list[Job], exc: Exception,
                 started: float) -> None:
        """The model failed on a batch of several jobs: find the ones it fails on.

        One input must not cost the others of its batch their answers, and must not
        multiply the runs of everyone's either: the batch is split in halves, a half that
        runs is handed to the commit thread, a half that fails is split again, so one
        culprit among N costs about 2 log2 N runs (10 for 32), not N. At most
        ``MaxRerunsPerFailedBatch`` runs per failed batch (0: twice its inputs, enough);
        the jobs not resolved within them are answered InferenceFailed. Once a model
        version's failed batches pass ``MaxFailedBatchesPerMinute``, its failed batches
        are answered InferenceFailed whole, without a run more (logged once when that
        starts, once when it ends).
        """
        reason = self._may_rerun(serving, len(jobs), exc)
        if reason is not None:
            self._inference_failed(jobs, f"the model failed on the batch this input was in "
                                   f"({exc}); it was not run again on its own: {reason}; "
                                   "send it again")
            return
        # 0 (the default): twice the inputs, the most a bisection can take (every node
        # of its tree but the root), so an input not at fault is never refused for want
        # of runs; the per-minute limit below bounds what that can cost
        budget = self.settings.max_reruns_per_failed_batch or 2 * len(jobs)
        runs = 0
        middle = len(jobs) // 2
        # (part, how it failed or None when not run yet), popped left half first, so
        # that the commits follow the jobs' admission order
        parts: list[tuple[list[Job], Exception | None]] = [(jobs[middle:], None),
                                                           (jobs[:middle], None)]
        while parts:
            part, failure = parts.pop()
            if failure is not None:
                if len(part) == 1:
                    self._inference_failed(part, f"the model failed on this input: {failure}")
                    continue
                middle = len(part) // 2
                parts += [(part[middle:], None), (part[:middle], None)]
                continue
            if runs >= budget:
                self._inference_failed(part, f"the model failed on the batch this input was "
                                       f"in ({exc}); the {budget} runs allowed to find the "
                                       "input at fault (Pipeline:MaxRerunsPerFailedBatch) "
                                       "were spent before this one was run again; send it "
                                       "again")
                continue
            runs += 1
            try:
                outputs = self._infer(serving, [item for job in part for item in job.items])
            except Exception as part_exc:
                parts.append((part, part_exc))
                continue
            self._hand_off(Inferred(serving, part, [j for j in part if j.admitted], outputs,
                                    (time.perf_counter() - started) * 1000))
        log.warning("batch_inference_failed", error=str(exc), batch=len(jobs), reruns=runs,
                    effect="the batch was split in halves until the inputs the model fails "
                    "on were found; only those are answered InferenceFailed")

    def _may_rerun(self, serving: Serving, size: int, exc: Exception) -> str | None:
        """None when this failed batch may be run again in parts; else why not."""
        limit = self.settings.max_failed_batches_per_minute
        version = (serving.model.provenance.name, serving.model.provenance.version)
        now = time.monotonic()
        if version not in self._failed_batches and len(self._failed_batches) >= 64:
            self._failed_batches.clear()  # versions retired since: forget them
        times = self._failed_batches.setdefault(version, deque(maxlen=max(1, limit)))
        while times and now - times[0] >= 60:
            times.popleft()
        allowed = len(times) < limit
        times.append(now)
        if allowed:
            if version in self._reruns_suspended:
                self._reruns_suspended.discard(version)
                log.info("batch_reruns_resumed", model=version[0], version=version[1],
                         effect="failed batches are split again to find the inputs at fault")
            return None
        reason = (f"more than {limit} failed batches of this model in a minute "
                  "(Pipeline:MaxFailedBatchesPerMinute)")
        if version not in self._reruns_suspended:
            self._reruns_suspended.add(version)
            log.warning("batch_reruns_suspended", model=version[0], version=version[1],
                        batch=size, error=str(exc), reason=reason,
                        effect="each failed batch of this model is answered InferenceFailed "
                        "whole, without running its inputs again, until its failures slow "
                        "down", fix="find the client sending inputs the model fails on")
        return reason

    def _inference_failed(self, jobs: list[Job], message: str) -> None:
        """Answer ``jobs`` InferenceFailed; their admitted room goes back, unbilled."""
        log.error("inference_failed", error=message, batch=len(jobs))
        self._release(jobs)
        self._leave_flights(jobs)
        for job in jobs:
            self._send_error(job.inbound, job.request_id, ErrorCode.INFERENCE_FAILED,
                             message, job.serving)
            job.handed = True

    def _release(self, jobs: Iterable[Job]) -> None:
        """Give back the meter room ``jobs`` were admitted with (once each)."""
        admitted = [job for job in jobs if job.admitted]
        for job in admitted:
            job.admitted = False
        if admitted:
            self.meter.release(len(admitted))

    # -- meter, then publish (the commit thread) ---------------------------

    def _commit_loop(self) -> None:
        """Group commit: every batch waiting here goes into one ledger transaction.

        Running apart from inference, the commit (an fsync with synchronous=FULL)
        overlaps the next batch's inference instead of stalling it.
        """
        while True:
            first = self.commits.get()
            if first is _STOP:
                self.commits.task_done()
                return
            group = [first]
            while True:
                try:
                    more = self.commits.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    self.commits.put(more)  # handled after this group
                    self.commits.task_done()
                    break
                group.append(more)
            try:
                self._commit_and_publish(group)
            except Exception as exc:  # never lose answers to a bug
                log.exception("commit_crashed", error=str(exc))
                self._leave_flights(job for inferred in group for job in inferred.jobs)
                for inferred in group:
                    for job in inferred.jobs:
                        if not job.answered:  # one answer per input, never a second
                            job.answered = True
                            try:
                                self._send_error(job.inbound, job.request_id,
                                                 ErrorCode.INTERNAL,
                                                 "internal error while publishing; see logs")
                            except Exception as send_exc:  # the next job still gets its own
                                log.error("error_not_sent", id=job.request_id,
                                          error=f"{type(send_exc).__name__}: {send_exc}",
                                          effect="the input stays unacknowledged, so the "
                                          "broker delivers it again")
            finally:
                for _ in group:
                    self.commits.task_done()

    def _commit_and_publish(self, group: list[Inferred]) -> None:
        # Every answer is shaped first: one that cannot be shaped gets InternalError and no
        # record. Then, durable before visible, the records of the shaped answers are
        # committed before any of them is published. Replays were billed when first
        # answered. Nothing is billed that is not answered, nothing answered unbilled.
        shaped = self._shape(group)
        for job in (job for inferred in group for job in inferred.jobs):
            if id(job) in shaped and not job.inbound.claim():  # nobody waits: not billed
                del shaped[id(job)]
                job.answered = True
        fresh = [job for inferred in group for job in inferred.fresh]
        # Every admitted (fresh) job holds a reservation in the meter until its commit
        # is attempted (``commit`` gives it back, committed or not); whatever fails
        # before that gives the rest back here, so admission never leaks room.
        attempted = 0
        failed: set[MeterSpec] = set()
        try:
            by_meter: dict[MeterSpec, list[Job]] = {}
            for inferred in group:
                by_meter.setdefault(inferred.serving.meter, []).extend(
                    job for job in inferred.fresh if id(job) in shaped)
            for spec, billable in by_meter.items():
                usages = [Usage(job.count * job.serving.quantity_per_item,
                                job.replay_key,
                                job.digest() if job.replay_key is not None else None)
                          for job in self._bill_once(billable)]
                if not usages:
                    continue
                attempted += len(usages)
                try:
                    self.meter.commit(spec, usages)
                except EdgeModuleError as exc:
                    log.error("metering_commit_failed", error=str(exc), batch=len(usages),
                              fix="free space under Data:Path if the disk is full; inputs "
                              "are refused with MeteringUnavailable until then")
                    failed.add(spec)
        finally:
            if attempted < len(fresh):
                self.meter.release(len(fresh) - attempted)
            # committed (or not): a copy admitted from now on finds the record instead
            self._leave_flights(job for inferred in group for job in inferred.jobs)
        if failed:
            # Only the batches whose records did not commit are refused: a result
            # whose record is stored is billed, so it must be delivered.
            for inferred in group:
                if inferred.serving.meter in failed:
                    for job in inferred.jobs:
                        if id(job) in shaped:
                            job.answered = True
                            self._send_error(job.inbound, job.request_id,
                                             ErrorCode.METERING_UNAVAILABLE,
                                             "the usage record could not be stored, so no "
                                             "result is released; send the input again "
                                             "once the disk under Data:Path has room",
                                             inferred.serving)
            group = [inferred for inferred in group if inferred.serving.meter not in failed]
        jobs = [job for inferred in group for job in inferred.jobs if id(job) in shaped]
        replays = sum(1 for job in jobs if job.replay_of is not None)
        if replays:
            self.metrics.replays.inc(replays)
        for inferred in group:
            provenance = inferred.serving.model.provenance
            for job in inferred.jobs:
                results = shaped.get(id(job))
                if results is None:
                    continue
                total_ms = (time.perf_counter() - job.inbound.received) * 1000
                body = result_envelope(job.request_id, provenance, results,
                                       {"decode": job.decode_ms, "infer": inferred.infer_ms,
                                        "total": total_ms})
                log.debug("result", id=job.request_id, source=job.inbound.source,
                          items=job.count, total_ms=round(total_ms, 3))
                job.answered = True
                try:
                    self.transport.send_result(job.inbound, body)
                except Exception as exc:  # one answer's failure must not touch the others
                    self.metrics.publish_failures.inc()
                    log.error("result_not_sent", id=job.request_id,
                              error=f"{type(exc).__name__}: {exc}", effect="the input stays "
                              "unacknowledged, so the broker delivers it again and it is "
                              "answered again without a second record", fix="report this "
                              "log line")
                    continue
                self.metrics.results_out.inc()
                self.metrics.end_to_end_seconds.observe(total_ms / 1000)
                self.activity.answered((provenance.name, provenance.version), total_ms)

    def _bill_once(self, jobs: list[Job]) -> list[Job]:
        """The jobs (of one meter, about to be committed together) that need a record.

        A job admitted while another copy of it was held is a repeat when that copy's
        record is in the ledger by now (commits run in admission order) or is about to
        be committed with this one; it is then answered as a replay, unbilled. A copy
        whose first was never billed (failed, refused, abandoned) is billed itself.
        """
        billing: dict[tuple[str, bytes], Job] = {}
        needed: list[Job] = []
        for job in jobs:
            key = job.replay_key
            # Any copy, not only a repeatable one: with several decode workers a
            # redelivery can be admitted before the first delivery it repeats, which is
            # then the copy (unnamed, not marked redelivered) whose twin is billed.
            if key is not None and job.copy_in_flight:
                if (key, job.digest()) in billing:
                    job.replay_of = SAME_COMMIT
                else:  # a marked redelivery matches at any age, anything else within
                    # the window (a message id reused after a session expired is new work)
                    job.replay_of = self.meter.replayed(
                        key, job.digest(),
                        None if job.inbound.redelivered else self._repeat_window_ms)
                if job.replay_of is not None:
                    continue
            if key is not None:
                billing.setdefault((key, job.digest()), job)
            needed.append(job)
        return needed

    def _enter_flight(self, job: Job) -> None:
        if job.replay_key is None or job.flight is not None:
            return
        job.flight = self._flights.enter((job.replay_key, job.digest()))
        job.copy_in_flight = job.flight.copy

    def _leave_flights(self, jobs: Iterable[Job]) -> None:
        for job in jobs:
            if job.flight is not None:
                self._flights.leave(job.flight)  # a no-op for an untracked copy
                job.flight = None

    def _shape(self, group: list[Inferred]) -> dict[int, list[dict[str, Any]]]:
        """Each job's results by ``id(job)``; a job whose answer cannot be shaped is
        answered InternalError here and left out (so it is never billed)."""
        shaped: dict[int, list[dict[str, Any]]] = {}
        for inferred in group:
            serving = inferred.serving
            offset = 0
            for job in inferred.jobs:
                n = job.count
                answering = Answering(serving.top_k, serving.score_threshold,
                                      "npy" if job.tensors == "npy" else "json")
                try:
                    results = serving.model.head.shape(
                        {name: value[offset:offset + n]
                         for name, value in inferred.outputs.items()},
                        job.frames, answering)
                    if len(results) != n:
                        raise ValueError(f"the {serving.model.head.name} head gave "
                                         f"{len(results)} results for {n} items")
                    shaped[id(job)] = results
                except Refusal as refusal:  # an answer too large for this request
                    job.answered = True
                    self._send_error(job.inbound, job.request_id, refusal.code,
                                     refusal.message, serving, **refusal.details)
                except Exception as exc:  # a head bug, or an output its load checks missed
                    log.error("answer_shaping_failed", id=job.request_id,
                              model=serving.model.provenance.name,
                              error=f"{type(exc).__name__}: {exc}", effect="answered "
                              "InternalError and not billed", fix="check that the model's "
                              "descriptor (labels, output) matches its graph")
                    job.answered = True
                    self._send_error(job.inbound, job.request_id, ErrorCode.INTERNAL,
                                     "the model's answer could not be shaped; see logs",
                                     serving)
                offset += n
        return shaped

    def _infer(self, serving: Serving, items: list[Item]) -> dict[str, np.ndarray]:
        max_items = serving.max_batch
        outputs: list[dict[str, np.ndarray]] = []
        for start in range(0, len(items), max_items):
            chunk = items[start:start + max_items]
            feeds = serving.model.stack(chunk)
            t0 = time.perf_counter()
            outputs.append(serving.model.run(feeds))
            self.metrics.inference_seconds.observe(time.perf_counter() - t0)
            self.metrics.batch_size.observe(len(chunk))
            self.metrics.items_inferred.inc(len(chunk))
        if len(outputs) == 1:
            return outputs[0]
        return {name: np.concatenate([chunk[name] for chunk in outputs]) for name in outputs[0]}

    def _send_error(self, inbound: Inbound, request_id: str, code: str, message: str,
                    serving: Serving | None = None, **extra: Any) -> None:
        self.metrics.errors.labels(code=code).inc()
        self.activity.failed(code, None if serving is None else
                             (serving.model.provenance.name, serving.model.provenance.version))
        log.info("request_refused", code=code, id=request_id, reason=message)
        self.transport.send_error(inbound, error_envelope(request_id, code, message, **extra))


def _batchable(job: Job, first: Job) -> bool:
    """Whether ``job`` may join ``first``'s batch: the same model version, and (for
    dynamic input sizes) the same item shapes."""
    return job.serving is first.serving and job.shape_key == first.shape_key


def _nbytes(items: Sequence[Item]) -> int:
    """The bytes a job's decoded tensors hold."""
    return sum(sum(value.nbytes for value in item.values()) if isinstance(item, dict)
               else item.nbytes for item in items)


def _named_id(body: dict[str, Any] | None) -> str | None:
    """The request's own id, for an error answered before the codec reads it."""
    value = body.get("id") if body is not None else None
    if isinstance(value, str) and 0 < len(value) <= 128:
        return value
    return None
