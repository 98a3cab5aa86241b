"""edgeHub transport: azure-iot-device 2.14's ``IoTHubModuleClient`` on an IoT Edge device.

Inputs arrive on edgeHub inputs (``EdgeHub:Inputs``) and go through the same
pipeline as MQTT; results go to the output ``EdgeHub:ResultOutput``, error
envelopes to ``EdgeHub:ErrorOutput``. An answer carries a new message id, the
input's correlation id (its message id when it has none) as correlation id,
and ``application/json`` as content type.

What the SDK does not do, this module does:

* **A bounded intake.** The SDK acknowledges an input to edgeHub before our
  handler runs and queues handler calls without limit. Inputs wait here in a
  queue of ``EdgeHub:IntakeQueue``; when it is full an input is answered at
  once on the error output with ``Overloaded`` (retryable, not billed). It is
  never dropped silently.
* **Timeouts and retries on sends.** ``send_message_to_output`` has no
  timeout and fails at once while disconnected. Answers are sent through the
  SDK's callback API (many in flight), re-sent when edgeHub does not
  acknowledge them within ``SendTimeoutSeconds`` while connected, retried with
  back-off while disconnected, and given up (logged with their id, counted)
  only after ``SendRetrySeconds``. A re-sent answer keeps its message id, so
  a consumer can drop the rare duplicate.
* **No double billing on redelivery.** edgeHub delivers at least once; an
  input with a message id is looked up in the ledger (id and payload digest),
  so one delivered again after an edgeHub restart is answered again but not
  billed again. Inputs without a message id cannot be recognised.
* **Short keep-alive and reconnect interval** (``KeepAlive``,
  ``RetryIntervalSeconds``), so a frozen or restarted edgeHub is noticed in
  seconds, not a minute.

The module twin and direct methods are handed to callbacks (``on_desired``,
``on_method``) that the application sets; this file only speaks the SDK.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from azure.iot.device import IoTHubModuleClient, Message, MethodResponse
from azure.iot.device.exceptions import (
    ClientError,
    OperationCancelled,
    OperationTimeout,
    ServiceError,
)

from edge_module import logs
from edge_module.config import EdgeHubSettings
from edge_module.envelope import error_envelope
from edge_module.errors import ErrorCode
from edge_module.exceptions import ConfigError
from edge_module.logs import get_logger
from edge_module.metrics import Metrics
from edge_module.supervisor import Spawn, start_thread
from edge_module.transport.base import Deliver, Inbound
from edge_module.transport.paho_fix import apply as apply_paho_fix

apply_paho_fix()
log = get_logger("edgehub")

EDGE_ENV = ("IOTEDGE_IOTHUBHOSTNAME", "IOTEDGE_DEVICEID", "IOTEDGE_MODULEID",
            "IOTEDGE_GATEWAYHOSTNAME", "IOTEDGE_MODULEGENERATIONID", "IOTEDGE_WORKLOADURI",
            "IOTEDGE_APIVERSION")
LOCAL_ENV = ("EdgeHubConnectionString", "EdgeModuleCACertificateFile")
MIN_BACKOFF = 0.5
MAX_BACKOFF = 5.0

# Everything the SDK's synchronous calls raise on purpose (not all derive from ClientError).
SDK_ERRORS = (ClientError, OperationCancelled, OperationTimeout, ServiceError)

DesiredHandler = Callable[[dict[str, Any], bool], None]
MethodHandler = Callable[[str, Any], tuple[int, Any]]


def create_client(settings: EdgeHubSettings) -> IoTHubModuleClient:
    """The module client from the IoT Edge environment (or the local-debugging variables)."""
    on_device = all(name in os.environ for name in EDGE_ENV)
    if not on_device and not all(name in os.environ for name in LOCAL_ENV):
        missing = [n for n in EDGE_ENV if n not in os.environ]
        raise ConfigError("Transport", f"edgehub needs the IoT Edge environment, but "
                          f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                          "set; fix: run the module under the IoT Edge runtime, or for a "
                          "local run set EdgeHubConnectionString and "
                          "EdgeModuleCACertificateFile (python -m simulator.edgehub prints "
                          "them)")
    if not on_device:  # the local-debugging connection string carries the module's key
        cs = os.environ["EdgeHubConnectionString"]  # noqa: SIM112 (the SDK's name)
        key = dict(part.partition("=")[::2] for part in cs.split(";")).get("SharedAccessKey")
        logs.register_secrets([cs, key or ""])
    try:
        client = IoTHubModuleClient.create_from_edge_environment(
            keep_alive=settings.keep_alive,
            connection_retry_interval=settings.retry_interval_seconds,
        )
    except (OSError, ValueError) as exc:
        cause = exc.__cause__ or exc
        where = "the workload API at IOTEDGE_WORKLOADURI" if on_device else \
            "EdgeHubConnectionString / EdgeModuleCACertificateFile"
        raise ConfigError("Transport", f"edgehub client could not be created from {where}: "
                          f"{type(cause).__name__}: {_no_secrets(str(cause))}; fix: check the "
                          "IoT Edge runtime (iotedge check) or those variables") from None
    if not hasattr(client, "_mqtt_pipeline"):  # pragma: no cover - guards an SDK upgrade
        raise ConfigError("Transport", "this azure-iot-device version is not supported; fix: "
                          "install the version pinned in requirements.lock (2.14)")
    return client


def _no_secrets(text: str) -> str:
    cs = os.environ.get("EdgeHubConnectionString", "")  # noqa: SIM112 (the SDK's name)
    return text.replace(cs, "<EdgeHubConnectionString>") if cs else text


_SEQ = itertools.count()


@dataclass(eq=False)
class _Answer:
    """One answer on its way to edgeHub."""

    inbound: Inbound
    message: Message
    output: str
    give_up_at: float
    attempts: int = 0
    sent_at: float = 0.0
    token: int = 0
    done: bool = False
    error: str | None = None
    seq: int = field(default_factory=lambda: next(_SEQ))


class EdgeHubTransport:
    def __init__(self, settings: EdgeHubSettings, metrics: Metrics,
                 client_factory: Callable[[EdgeHubSettings], IoTHubModuleClient] = create_client
                 ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.inputs: frozenset[str] = frozenset(settings.inputs)
        self.on_desired: DesiredHandler | None = None
        self.on_method: MethodHandler | None = None
        self.on_connected: Callable[[], None] | None = None
        self._client = client_factory(settings)
        self._deliver: Deliver | None = None
        self._accepting = True
        self._handing_over = True  # queued inputs still go to the pipeline
        self._closing = threading.Event()
        self._intake: queue.Queue[Inbound | None] = queue.Queue(maxsize=settings.intake_queue)
        self._lock = threading.Condition()
        self._inflight: dict[int, _Answer] = {}
        self._retries: list[tuple[float, int, _Answer]] = []
        self._tokens = itertools.count(1)
        self._was_connected = False
        self._threads: list[threading.Thread] = []
        self.spawn: Spawn = start_thread  # the app's supervisor runs the long-lived loops

    # -- lifecycle --------------------------------------------------------

    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        client = self._client
        client.on_message_received = self._on_message
        client.on_twin_desired_properties_patch_received = self._on_desired_patch
        client.on_method_request_received = self._on_method
        client.on_connection_state_change = self._on_connection_state  # type: ignore[assignment]
        self._threads.append(self.spawn("edgehub-intake", self._feed))
        self._threads.append(self.spawn("edgehub-outbox", self._outbox))
        # Connecting ends once connected: a one-shot thread, not a supervised loop.
        self._threads.append(start_thread("edgehub-connect", self._connect_loop))
        log.info("edgehub_connecting", inputs=sorted(self.inputs),
                 outputs=[self.settings.result_output, self.settings.error_output],
                 keep_alive=self.settings.keep_alive)

    def _connect_loop(self) -> None:
        """Connect (retrying until it works), then read the twin's desired properties."""
        delay = MIN_BACKOFF
        while not self._closing.is_set():
            try:
                self._client.connect()
                break
            except SDK_ERRORS as exc:
                log.warning("edgehub_connect_failed", error=f"{type(exc).__name__}: {exc}",
                            retry_in_s=delay, fix="check that edgeHub runs and that "
                            "IOTEDGE_GATEWAYHOSTNAME resolves to it")
                self._closing.wait(delay)
                delay = min(MAX_BACKOFF * 2, delay * 2)
        if not self._was_connected:  # the SDK signals changes after the first connect only
            self._on_connection_state()
        self._read_twin()

    def _read_twin(self) -> None:
        if self._closing.is_set() or self.on_desired is None:
            return
        try:
            twin = self._client.get_twin()
        except SDK_ERRORS as exc:
            log.warning("edgehub_twin_unavailable", error=f"{type(exc).__name__}: {exc}",
                        effect="desired properties apply when the next patch arrives")
            return
        self._call_desired(dict(twin.get("desired", {})), True)

    @property
    def connected(self) -> bool:
        return bool(self._client.connected)

    def set_inputs(self, inputs: frozenset[str]) -> None:
        """Serve these inputs from now on (``EdgeHub:Inputs`` changed live)."""
        self.inputs = inputs

    def stop_intake(self) -> None:
        """Take no new input; inputs already taken are handed to the pipeline (up to 5 s),
        and any left after that are answered with ``ShuttingDown``."""
        self._accepting = False
        deadline = time.monotonic() + 5
        while self._intake.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        self._handing_over = False  # from now on the feeder answers ShuttingDown
        log.info("edgehub_intake_stopped", left=self._intake.qsize())

    def close(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._inflight or self._retries:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(min(left, 0.05))
            left_over = len(self._inflight) + len(self._retries)
        if left_over:
            self.metrics.results_undelivered.inc(left_over)
            log.error("edgehub_answers_undelivered_at_shutdown", count=left_over,
                      effect="these answers were not acknowledged by edgeHub before the "
                      "shutdown budget (Pipeline:ShutdownSeconds) ran out")
        self._closing.set()
        with contextlib.suppress(queue.Full):
            self._intake.put_nowait(None)  # the feeder is a daemon thread either way
        with contextlib.suppress(Exception):  # the SDK may raise anything while tearing down
            self._client.shutdown()
        log.info("edgehub_closed")

    # -- inputs -----------------------------------------------------------

    def _on_message(self, message: Message) -> None:
        """Runs on one of the SDK's handler threads, after the SDK acknowledged the input."""
        data = message.data
        payload = data if isinstance(data, bytes) else str(data).encode()
        source = str(message.input_name or "")
        # The SDK hides MQTT's DUP flag, so any input with a message id may be a redelivery
        # (edgeHub restarted before it saw our acknowledgement): the ledger recognises the
        # same id with the same payload and answers it again without billing it twice.
        key = f"edgehub:{source}:{message.message_id}" if message.message_id else None
        inbound = Inbound(
            payload=payload, source=source,
            correlation_id=message.correlation_id or message.message_id,
            content_type=message.content_type, delivery_key=key, redelivered=key is not None)
        inbound.model, inbound.version = self.settings.model_for(source)
        if not self._accepting or self._closing.is_set():
            self._refuse(inbound, ErrorCode.SHUTTING_DOWN, "the module is shutting down; "
                         "send the input again in a moment", retryable=True)
            return
        if "*" not in self.inputs and inbound.source not in self.inputs:
            self._refuse(inbound, ErrorCode.UNKNOWN_INPUT,
                         f"input {inbound.source!r} is not served; fix: route to one of "
                         f"{', '.join(sorted(self.inputs))} or add it to EdgeHub:Inputs")
            return
        try:
            self._intake.put_nowait(inbound)
        except queue.Full:
            self._refuse(inbound, ErrorCode.OVERLOADED, "the module's intake is full; send "
                         "the input again later, or raise EdgeHub:IntakeQueue", retryable=True)

    def _refuse(self, inbound: Inbound, code: str, message: str, **extra: Any) -> None:
        self.metrics.errors.labels(code=code).inc()
        log.info("request_refused", code=code, input=inbound.source, reason=message)
        request_id = inbound.correlation_id or uuid.uuid4().hex
        self.send_error(inbound, error_envelope(request_id, code, message, **extra))

    def _feed(self) -> None:
        """Hands queued inputs to the pipeline, one at a time (``deliver`` may block)."""
        assert self._deliver is not None
        while True:
            inbound = self._intake.get()
            try:
                if inbound is None:
                    return
                if self._handing_over:
                    self._deliver(inbound)
                else:
                    self._refuse(inbound, ErrorCode.SHUTTING_DOWN, "the module is shutting "
                                 "down; send the input again in a moment", retryable=True)
            except Exception as exc:  # a bug in the hand-over must not stop the intake
                log.exception("edgehub_feed_error", error=f"{type(exc).__name__}: {exc}",
                              fix="report this log line; the input is answered InternalError")
                if inbound is not None:
                    self._refuse(inbound, ErrorCode.INTERNAL, "internal error while taking "
                                 "the input; see logs", retryable=True)
            finally:
                self._intake.task_done()

    # -- answers ----------------------------------------------------------

    def send_result(self, inbound: Inbound, body: bytes) -> None:
        self._send(inbound, body, self.settings.result_output)

    def send_error(self, inbound: Inbound, body: bytes) -> None:
        self._send(inbound, body, self.settings.error_output)

    def _send(self, inbound: Inbound, body: bytes, output: str) -> None:
        message = Message(body, message_id=uuid.uuid4().hex,  # type: ignore[no-untyped-call]
                          content_encoding="utf-8", content_type="application/json",
                          output_name=output)
        if inbound.correlation_id is not None:
            message.correlation_id = inbound.correlation_id
        message.custom_properties["inputName"] = inbound.source
        answer = _Answer(inbound, message, output,
                         give_up_at=time.monotonic() + self.settings.send_retry_seconds)
        self._attempt(answer)

    def _attempt(self, answer: _Answer) -> None:
        with self._lock:
            if answer.done:
                return
            answer.attempts += 1
            answer.sent_at = time.monotonic()
            answer.token = token = next(self._tokens)
            self._inflight[answer.seq] = answer
        if answer.attempts > 1:
            self.metrics.send_retries.inc()
        try:
            # The SDK's callback form of send_message_to_output (which only adds a blocking
            # wait without timeout): many answers in flight, our own timeouts.
            self._client._mqtt_pipeline.send_output_message(  # type: ignore[no-untyped-call]
                answer.message, callback=lambda error=None: self._sent(answer, token, error))
        except Exception as exc:  # the pipeline refuses at once (e.g. shut down)
            self._sent(answer, token, exc)

    def _sent(self, answer: _Answer, token: int, error: BaseException | None) -> None:
        """The SDK's verdict on one attempt (on the SDK's callback thread: must not block)."""
        settle = False
        with self._lock:
            if answer.done or token != answer.token:
                return  # an older attempt, superseded by a resend
            if error is None:
                answer.done = True
                self._inflight.pop(answer.seq, None)
                settle = True
            else:
                answer.error = f"{type(error).__name__}: {error}"
                self._inflight.pop(answer.seq, None)
                backoff = min(MAX_BACKOFF, MIN_BACKOFF * 2 ** min(answer.attempts - 1, 6))
                heapq.heappush(self._retries, (time.monotonic() + backoff, answer.seq, answer))
            self._lock.notify_all()
        if settle:
            log.debug("edgehub_answer_acknowledged", output=answer.output,
                      message_id=answer.message.message_id,
                      correlation_id=answer.message.correlation_id, attempts=answer.attempts)
            answer.inbound.settle()

    def _outbox(self) -> None:
        """Re-sends answers whose attempt failed or timed out; gives up after the budget."""
        timeout = self.settings.send_timeout_seconds
        while not self._closing.is_set():
            now = time.monotonic()
            due: list[_Answer] = []
            expired: list[_Answer] = []
            connected = self.connected
            with self._lock:
                while self._retries and self._retries[0][0] <= now:
                    _, _, answer = heapq.heappop(self._retries)
                    (expired if now >= answer.give_up_at else due).append(answer)
                if connected:
                    for answer in list(self._inflight.values()):
                        if now - answer.sent_at >= timeout:
                            if now >= answer.give_up_at:
                                self._inflight.pop(answer.seq, None)
                                expired.append(answer)
                            else:
                                answer.error = f"not acknowledged within {timeout} s"
                                due.append(answer)
                for answer in expired:
                    answer.done = True
                if expired:
                    self._lock.notify_all()
            for answer in expired:
                self._give_up(answer)
            for answer in due:
                self._attempt(answer)
            with self._lock:
                self.metrics.answers_in_flight.set(len(self._inflight) + len(self._retries))
            self._closing.wait(0.1)

    def _give_up(self, answer: _Answer) -> None:
        self.metrics.results_undelivered.inc()
        log.error("edgehub_answer_undelivered", output=answer.output,
                  message_id=answer.message.message_id,
                  correlation_id=answer.message.correlation_id, attempts=answer.attempts,
                  last_error=answer.error,
                  effect="the answer is lost after EdgeHub:SendRetrySeconds; its usage was "
                  "recorded", fix="check edgeHub (iotedge logs edgeHub) or raise "
                  "EdgeHub:SendRetrySeconds")
        answer.inbound.settle()

    def _on_connection_state(self) -> None:
        connected = self.connected
        self.metrics.connected.set(1 if connected else 0)
        if connected:
            with self._lock:
                now = time.monotonic()
                for answer in self._inflight.values():  # a fresh timeout on the new link
                    answer.sent_at = now
                # Answers backing off while the link was down go now, not after their delay.
                self._retries = [(now, seq, answer) for _, seq, answer in self._retries]
                heapq.heapify(self._retries)
            log.info("edgehub_connected", reconnect=self._was_connected)
            if self._was_connected:
                self._resubscribe()
                # The SDK does not read the twin again: desired changes made while we were
                # away would be missed.
                threading.Thread(target=self._read_twin, name="edgehub-twin",
                                 daemon=True).start()
            self._was_connected = True
            if self.on_connected is not None:
                self.on_connected()
        else:
            log.warning("edgehub_disconnected", retry_in_s=self.settings.retry_interval_seconds)

    def _resubscribe(self) -> None:
        """Subscribe again to inputs, methods and twin topics after a reconnect.

        The SDK relies on edgeHub keeping its session; an edgeHub recreated without
        its store (or a broker without persistence) forgets the subscriptions and the
        module would silently receive nothing. Subscribing again is idempotent.
        """
        pipeline = self._client._mqtt_pipeline
        for feature, enabled in list(pipeline.feature_enabled.items()):
            if enabled:
                def done(error: BaseException | None = None, feature: str = feature) -> None:
                    if error is not None:
                        log.warning("edgehub_resubscribe_failed", feature=feature,
                                    error=f"{type(error).__name__}: {error}")
                pipeline.enable_feature(feature, callback=done)  # type: ignore[no-untyped-call]

    # -- twin and direct methods -----------------------------------------

    def _on_desired_patch(self, patch: dict[str, Any]) -> None:
        self._call_desired(dict(patch), False)

    def _call_desired(self, desired: dict[str, Any], full: bool) -> None:
        if self.on_desired is None:
            return
        try:
            self.on_desired(desired, full)
        except Exception as exc:  # a bug must not kill the SDK's handler thread
            log.exception("twin_update_crashed", error=str(exc))

    def report(self, patch: dict[str, Any]) -> bool:
        """Patch the reported properties; False (and logged) when edgeHub is unreachable."""
        try:
            self._client.patch_twin_reported_properties(patch)
            return True
        except SDK_ERRORS as exc:
            log.warning("twin_report_failed", error=f"{type(exc).__name__}: {exc}",
                        effect="sent again with the next change")
            return False

    def _on_method(self, request: Any) -> None:
        status: int
        body: Any
        if self.on_method is None:
            status, body = 501, {"error": "direct methods are not available"}
        else:
            try:
                status, body = self.on_method(request.name, request.payload)
            except Exception as exc:
                log.exception("method_crashed", method=request.name, error=str(exc))
                status, body = 500, {"error": f"internal error in {request.name}; see the "
                                     "module's logs"}
        label = request.name if status != 404 else "unknown"  # bounded label values
        self.metrics.method_calls.labels(method=label, status=str(status)).inc()
        try:
            self._client.send_method_response(
                MethodResponse.create_from_method_request(request, status, body))
        except SDK_ERRORS as exc:
            log.warning("method_response_failed", method=request.name,
                        error=f"{type(exc).__name__}: {exc}")
