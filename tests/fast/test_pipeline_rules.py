"""The pipeline's rules, in process: batching, the gate, admission, replays, live swaps.

The real digits model answers; a real SQLite ledger meters; only the transport is
replaced by one that keeps the answers (tests/fast/conftest.py).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_module.config import PipelineSettings
from edge_module.errors import ErrorCode
from edge_module.exceptions import Refusal
from edge_module.inference.descriptor import Descriptor
from edge_module.inference.heads import Answering, Frame, register
from edge_module.inference.heads.base import Shapes
from edge_module.inference.heads.classification import ClassificationHead
from edge_module.inference.models import Model
from edge_module.metering.ledger import Ledger
from edge_module.metering.meter import LedgerMeter
from edge_module.metering.records import MeterSpec, Usage
from edge_module.metrics import Metrics
from edge_module.pipeline import Pipeline
from edge_module.transport.base import Inbound
from simulator.datasets import digit_image, digits_split
from tests.fast.conftest import RecordingTransport, make_ledger


@pytest.fixture(scope="module")
def held_out() -> tuple[np.ndarray, np.ndarray]:
    _, x, _, y = digits_split()
    return x[:40], y[:40]


METER_SPEC = MeterSpec("digits.image.classify", "image-classification")


def _metric(metrics: Metrics, name: str) -> float:
    for line in metrics.render().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


class Gate:
    """A licence decision the test switches: open, or refusing with Unlicensed."""

    def __init__(self) -> None:
        self.open = True

    def gate_check(self) -> None:
        if not self.open:
            raise Refusal("Unlicensed", "no licence in this test", status="Invalid")


def _pipeline(model: Model, transport: RecordingTransport, ledger: Ledger,
              gate: Gate | None = None, **settings: object) -> tuple[Pipeline, Metrics]:
    metrics = Metrics()
    pipe = Pipeline(model, PipelineSettings.model_validate(settings), transport, metrics,
                    LedgerMeter(ledger, metrics), gate)
    pipe.start()
    return pipe, metrics


@pytest.fixture
def stop_after() -> Iterator[list[Pipeline]]:
    started: list[Pipeline] = []
    yield started
    for pipe in started:
        pipe.drain(5)
        pipe.stop()


def _inbound(payload: bytes, key: str | None = None, redelivered: bool = False,
             source: str = "em/in/test") -> Inbound:
    return Inbound(payload, source, delivery_key=key, redelivered=redelivered)


def test_requests_waiting_together_are_inferred_in_one_batch(
        digits: Model, transport: RecordingTransport, ledger: Ledger,
        held_out: tuple[np.ndarray, np.ndarray], stop_after: list[Pipeline]) -> None:
    x, y = held_out
    pipe, metrics = _pipeline(digits, transport, ledger, MaxBatchSize=8,
                              MaxQueueDelayMs=500)
    stop_after.append(pipe)
    for pixels in x[:8]:
        pipe.submit(_inbound(digit_image(pixels)))
    transport.wait_answers(8)
    assert transport.errors == []
    labels = [json.loads(body)["results"][0]["label"] for _, body in transport.results]
    assert sorted(labels) == sorted(str(v) for v in y[:8])
    # 8 requests queued within the delay: far fewer session.run calls than requests
    assert _metric(metrics, "edge_module_items_inferred_total") == 8
    assert _metric(metrics, "edge_module_inference_seconds_count") <= 2
    assert ledger.pending == 8  # one record per answered request


def test_a_batch_never_exceeds_the_batch_size(
        digits: Model, transport: RecordingTransport, ledger: Ledger,
        held_out: tuple[np.ndarray, np.ndarray], stop_after: list[Pipeline]) -> None:
    x, _ = held_out
    pipe, metrics = _pipeline(digits, transport, ledger, MaxBatchSize=4,
                              MaxQueueDelayMs=200)
    stop_after.append(pipe)
    for pixels in x[:12]:
        pipe.submit(_inbound(digit_image(pixels)))
    transport.wait_answers(12)
    assert _metric(metrics, "edge_module_inference_seconds_count") >= 3
    assert _metric(metrics, "edge_module_batch_size_sum") == 12
    bucket_4 = _metric(metrics, 'edge_module_batch_size_bucket{le="4.0"}')
    assert bucket_4 == _metric(metrics, "edge_module_batch_size_count")


def test_a_closed_gate_refuses_unbilled_and_reopening_serves_again(
        digits: Model, transport: RecordingTransport, ledger: Ledger,
        held_out: tuple[np.ndarray, np.ndarray], stop_after: list[Pipeline]) -> None:
    x, _ = held_out
    gate = Gate()
    gate.open = False
    pipe, _ = _pipeline(digits, transport, ledger, gate)
    stop_after.append(pipe)
    pipe.submit(_inbound(digit_image(x[0])))
    transport.wait_answers(1)
    error = json.loads(transport.errors[0][1])["error"]
    assert error["code"] == "Unlicensed" and error["status"] == "Invalid"
    assert ledger.pending == 0
    gate.open = True
    pipe.submit(_inbound(digit_image(x[1])))
    transport.wait_answers(2)
    assert len(transport.results) == 1 and ledger.pending == 1


def test_admission_stops_at_the_cap_and_nothing_past_it_is_billed(
        digits: Model, transport: RecordingTransport, tmp_path: Path,
        held_out: tuple[np.ndarray, np.ndarray], stop_after: list[Pipeline]) -> None:
    x, _ = held_out
    ledger = make_ledger(tmp_path / "capped.db", MaxPendingRecords=5)
    pipe, _ = _pipeline(digits, transport, ledger)
    stop_after.append(pipe)
    for pixels in x[:9]:
        pipe.submit(_inbound(digit_image(pixels)))
    transport.wait_answers(9)
    codes = [json.loads(body)["error"]["code"] for _, body in transport.errors]
    assert len(transport.results) == 5 and codes == ["MeteringBufferFull"] * 4
    assert ledger.pending == 5
    ledger.close()


def test_a_redelivered_input_is_answered_again_without_a_second_record(
        digits: Model, transport: RecordingTransport, ledger: Ledger,
        held_out: tuple[np.ndarray, np.ndarray], stop_after: list[Pipeline]) -> None:
    x, _ = held_out
    pipe, metrics = _pipeline(digits, transport, ledger)
    stop_after.append(pipe)
    payload = digit_image(x[0])
    pipe.submit(_inbound(payload, key="session-1:17"))
    transport.wait_answers(1)
    pipe.submit(_inbound(payload, key="session-1:17", redelivered=True))
    transport.wait_answers(2)
    # same packet id, other bytes: a new input that reuses the id, so a new record
    pipe.submit(_inbound(digit_image(x[1]), key="session-1:17", redelivered=True))
    transport.wait_answers(3)
    assert len(transport.results) == 3
    assert ledger.pending == 2
    assert _metric(metrics, "edge_module_replayed_messages_total") == 1


def test_a_swap_while_requests_flow_answers_each_with_the_model_it_started_with(
        digits: Model, transport: RecordingTransport, ledger: Ledger,
        held_out: tuple[np.ndarray, np.ndarray], stop_after: list[Pipeline]) -> None:
    x, _ = held_out
    pipe, _ = _pipeline(digits, transport, ledger, MaxBatchSize=4, MaxQueueDelayMs=5)
    stop_after.append(pipe)
    done = threading.Event()

    def swap_back_and_forth() -> None:
        top_k = 1
        while not done.is_set():
            pipe.reconfigure(top_k=top_k)
            top_k = 3 if top_k == 1 else 1
            done.wait(0.002)

    swapper = threading.Thread(target=swap_back_and_forth)
    swapper.start()
    try:
        for pixels in x[:40]:
            pipe.submit(_inbound(digit_image(pixels)))
        transport.wait_answers(40)
    finally:
        done.set()
        swapper.join()
    assert transport.errors == []
    sizes = {len(json.loads(body)["results"][0]["topK"]) for _, body in transport.results}
    assert sizes <= {1, 3}  # every answer is whole under one Serving, never a mix
    assert ledger.pending == 40


def test_a_bad_payload_is_answered_at_once_and_never_billed(
        digits: Model, transport: RecordingTransport, ledger: Ledger,
        held_out: tuple[np.ndarray, np.ndarray], stop_after: list[Pipeline]) -> None:
    x, _ = held_out
    pipe, _ = _pipeline(digits, transport, ledger)
    stop_after.append(pipe)
    pipe.submit(_inbound(b"{not json"))
    pipe.submit(_inbound(digit_image(x[0])))
    transport.wait_answers(2)
    assert [json.loads(b)["error"]["code"] for _, b in transport.errors] == ["InvalidJson"]
    assert len(transport.results) == 1 and ledger.pending == 1


class FailsOnHighDigits(ClassificationHead):
    """A head that cannot shape answers whose best class is 5 or more: a head bug at
    answer time, which load checks cannot catch."""

    name = "test-fails-on-high-digits"

    @classmethod
    def build(cls, descriptor: Descriptor, shapes: Shapes) -> FailsOnHighDigits:
        plain = ClassificationHead.build(
            descriptor.model_copy(update={"head": "classification"}), shapes)
        return cls(plain.outputs[0], plain.labels, plain.logits)

    def shape(self, outputs: Mapping[str, np.ndarray], frames: Sequence[Frame | None],
              answering: Answering) -> list[dict[str, Any]]:
        if int(np.argmax(outputs[self.outputs[0]][0])) >= 5:
            raise self.failure()
        return super().shape(outputs, frames, answering)

    def failure(self) -> Exception:
        return IndexError("this head cannot shape digits above 4")


def test_an_answer_that_cannot_be_shaped_is_an_error_and_never_billed(
        transport: RecordingTransport, ledger: Ledger, tmp_path: Path,
        held_out: tuple[np.ndarray, np.ndarray], stop_after: list[Pipeline]) -> None:
    """A head that raises on some answers: those answers fail while shaping, before their
    usage is recorded, so they are InternalError and never billed."""
    import shutil

    from edge_module.config import BUILTIN_MODELS

    register(FailsOnHighDigits.name, FailsOnHighDigits.build)
    shutil.copy(BUILTIN_MODELS / "digits.onnx", tmp_path / "picky.onnx")
    descriptor = json.loads((BUILTIN_MODELS / "digits.json").read_text())
    descriptor["head"] = FailsOnHighDigits.name
    (tmp_path / "picky.json").write_text(json.dumps(descriptor))
    model = Model(tmp_path / "picky.onnx")
    x, _ = held_out
    metrics = Metrics()
    pipe = Pipeline(model, PipelineSettings(), transport, metrics,
                    LedgerMeter(ledger, metrics), top_k=1)
    pipe.start()
    stop_after.append(pipe)
    for pixels in x[:20]:
        pipe.submit(_inbound(digit_image(pixels)))
    transport.wait_answers(20)
    codes = [json.loads(body)["error"]["code"] for _, body in transport.errors]
    labels = [json.loads(body)["results"][0]["label"] for _, body in transport.results]
    assert codes and set(codes) == {"InternalError"}
    assert labels and set(labels) <= {"0", "1", "2", "3", "4"}
    assert len(codes) + len(labels) == 20
    assert ledger.pending == len(transport.results)  # billed == answered, errors unbilled
    assert ledger.admit(10**6) == 10**6 - ledger.pending  # no admission leaked


def _named(request_id: str, pixels: np.ndarray) -> bytes:
    import base64

    return json.dumps({"id": request_id,
                       "image": base64.b64encode(digit_image(pixels)).decode()}).encode()


def test_a_named_request_sent_again_is_answered_again_and_billed_once(
        digits: Model, transport: RecordingTransport, ledger: Ledger,
        held_out: tuple[np.ndarray, np.ndarray], stop_after: list[Pipeline]) -> None:
    """QoS 1 is at-least-once: a broker that died before acknowledging a publish gets it
    again from the sender and forwards it as a new message (no DUP flag, a new packet id).
    The client's own request id with the same bytes tells the repeat apart."""
    x, _ = held_out
    pipe, metrics = _pipeline(digits, transport, ledger, MaxQueueDelayMs=0)
    stop_after.append(pipe)
    pipe.submit(_inbound(_named("cam-1", x[0]), key="101"))
    transport.wait_answers(1)
    pipe.submit(_inbound(_named("cam-1", x[0]), key="7"))  # the repeat: new packet id
    transport.wait_answers(2)
    pipe.submit(_inbound(_named("cam-1", x[1]), key="8"))  # same name, other bytes: new
    pipe.submit(_inbound(digit_image(x[2]), key="9"))  # no name: raw bytes
    pipe.submit(_inbound(digit_image(x[2]), key="10"))  # sent twice on purpose: billed twice
    transport.wait_answers(5)
    assert len(transport.results) == 5 and transport.errors == []
    assert ledger.pending == 4
    assert _metric(metrics, "edge_module_replayed_messages_total") == 1


def test_copies_of_a_named_request_in_one_batch_are_billed_once(
        digits: Model, transport: RecordingTransport, ledger: Ledger,
        held_out: tuple[np.ndarray, np.ndarray], stop_after: list[Pipeline]) -> None:
    x, _ = held_out
    pipe, _ = _pipeline(digits, transport, ledger, MaxBatchSize=8, MaxQueueDelayMs=300)
    stop_after.append(pipe)
    for key in ("1", "2", "3"):
        pipe.submit(_inbound(_named("cam-2", x[3]), key=key))
    transport.wait_answers(3)
    ids = {json.loads(body)["id"] for _, body in transport.results}
    assert len(transport.results) == 3 and ids == {"cam-2"}
    assert ledger.pending == 1


def test_copies_refused_with_the_first_are_never_answered_unbilled(
        digits: Model, transport: RecordingTransport, tmp_path: Path,
        held_out: tuple[np.ndarray, np.ndarray], stop_after: list[Pipeline]) -> None:
    x, _ = held_out
    ledger = make_ledger(tmp_path / "full.db", MaxPendingRecords=1)
    ledger.admit(1)
    ledger.append(METER_SPEC, [Usage(1)])  # the buffer is full before the copies arrive
    pipe, _ = _pipeline(digits, transport, ledger, MaxBatchSize=8, MaxQueueDelayMs=300)
    stop_after.append(pipe)
    for key in ("1", "2"):
        pipe.submit(_inbound(_named("cam-3", x[4]), key=key))
    transport.wait_answers(2)
    codes = [json.loads(body)["error"]["code"] for _, body in transport.errors]
    assert transport.results == [] and codes == ["MeteringBufferFull"] * 2
    ledger.close()


def test_a_name_repeated_after_the_window_is_a_new_request(
        digits: Model, transport: RecordingTransport, ledger: Ledger,
        held_out: tuple[np.ndarray, np.ndarray], stop_after: list[Pipeline]) -> None:
    """A device that names its readings by device ("pump-7") and repeats the same bytes an
    hour later makes a new request: the name check only covers Pipeline:RepeatWindowSeconds."""
    x, _ = held_out
    pipe, _ = _pipeline(digits, transport, ledger, MaxQueueDelayMs=0, RepeatWindowSeconds=1)
    stop_after.append(pipe)
    pipe.submit(_inbound(_named("pump-7", x[5]), key="1"))
    transport.wait_answers(1)
    time.sleep(1.2)
    pipe.submit(_inbound(_named("pump-7", x[5]), key="2"))
    transport.wait_answers(2)
    assert ledger.pending == 2


class HeldMeter(LedgerMeter):
    """The real ledger meter, whose commits wait until the test lets them through: a
    batch held between admission and its usage record, for as long as the test needs."""

    def __init__(self, ledger: Ledger, metrics: Metrics) -> None:
        super().__init__(ledger, metrics)
        self.go = threading.Event()

    def commit(self, spec: MeterSpec, usages: Sequence[Usage]) -> list[str]:
        assert self.go.wait(10), "the test never let the commit through"
        return super().commit(spec, usages)


def test_a_named_copy_arriving_while_the_first_is_in_flight_is_billed_once(
        digits: Model, transport: RecordingTransport, ledger: Ledger,
        held_out: tuple[np.ndarray, np.ndarray], stop_after: list[Pipeline]) -> None:
    """The first copy is admitted and inferred, its commit held; the copies arrive, find
    no record in the ledger yet, and are inferred in batches of their own. Each is
    answered; one record is written, whichever order the commits take."""
    x, _ = held_out
    metrics = Metrics()
    meter = HeldMeter(ledger, metrics)
    pipe = Pipeline(digits, PipelineSettings.model_validate(
        {"MaxBatchSize": 1, "MaxQueueDelayMs": 0}), transport, metrics, meter)
    pipe.start()
    stop_after.append(pipe)
    pipe.submit(_inbound(_named("cam-9", x[6]), key="1"))
    deadline = time.monotonic() + 10
    while _metric(metrics, "edge_module_items_inferred_total") < 1:
        assert time.monotonic() < deadline, "the first copy was never inferred"
        time.sleep(0.01)
    for key in ("2", "3"):  # the first copy is inferred, its record not yet written
        pipe.submit(_inbound(_named("cam-9", x[6]), key=key))
    pipe.submit(_inbound(_named("cam-10", x[7]), key="4"))  # another name: its own record
    while _metric(metrics, "edge_module_items_inferred_total") < 4:
        assert time.monotonic() < deadline, "the copies were never inferred"
        time.sleep(0.01)
    assert transport.results == [] and ledger.pending == 0
    meter.go.set()
    transport.wait_answers(4)
    ids = sorted(json.loads(body)["id"] for _, body in transport.results)
    assert ids == ["cam-10", "cam-9", "cam-9", "cam-9"] and transport.errors == []
    assert ledger.pending == 2
    assert _metric(metrics, "edge_module_replayed_messages_total") == 2
    assert ledger.admit(10**6) == 10**6 - 2  # the copies' admitted room came back
    assert len(pipe._flights) == 0  # nothing left held


def test_a_copy_whose_first_was_abandoned_is_billed_itself(
        digits: Model, transport: RecordingTransport, ledger: Ledger,
        held_out: tuple[np.ndarray, np.ndarray], stop_after: list[Pipeline]) -> None:
    """An HTTP client gives up on its request and sends it again (same id, same body);
    both copies land in one batch. The abandoned one is neither answered nor billed, so
    the copy that is answered carries the record."""
    from edge_module.transport.http import HttpInbound

    x, _ = held_out
    pipe, _ = _pipeline(digits, transport, ledger, MaxBatchSize=8, MaxQueueDelayMs=300)
    stop_after.append(pipe)
    first = HttpInbound(_named("req-1", x[8]), "http")
    first.abandon()  # the client timed out before the answer was claimed
    pipe.submit(first)
    pipe.submit(HttpInbound(_named("req-1", x[8]), "http"))
    transport.wait_answers(1)
    assert pipe.drain(5)
    assert [inbound is first for inbound, _ in transport.results] == [False]
    assert ledger.pending == 1  # answered once, billed once


def test_one_input_the_model_fails_on_costs_the_rest_of_its_batch_nothing(
        tmp_path: Path, transport: RecordingTransport, ledger: Ledger,
        held_out: tuple[np.ndarray, np.ndarray], stop_after: list[Pipeline]) -> None:
    """A batch whose session.run fails is run again request by request: only the input the
    model fails on gets InferenceFailed (unbilled); the others are answered and billed."""
    from tests.models import fragile_model

    model = Model(fragile_model(tmp_path))
    pipe, _ = _pipeline(model, transport, ledger, MaxBatchSize=8, MaxQueueDelayMs=300)
    stop_after.append(pipe)
    for i, value in enumerate([1.0, 2.0, 99.0, 3.0]):
        pipe.submit(_inbound(json.dumps({"id": f"f{i}", "tensor": [value]}).encode()))
    transport.wait_answers(4)
    codes = {json.loads(body)["id"]: json.loads(body)["error"]["code"]
             for _, body in transport.errors}
    assert codes == {"f2": "InferenceFailed"}
    assert sorted(json.loads(body)["id"] for _, body in transport.results) == \
        ["f0", "f1", "f3"]
    assert ledger.pending == 3
    assert ledger.admit(10**6) == 10**6 - 3


def _answers(transport: RecordingTransport) -> dict[str, list[str]]:
    """Every answer by request id: "result" or the error code, in the order sent."""
    seen: dict[str, list[str]] = {}
    for _, body in transport.results:
        seen.setdefault(json.loads(body)["id"], []).append("result")
    for _, body in transport.errors:
        answer = json.loads(body)
        seen.setdefault(answer["id"], []).append(answer["error"]["code"])
    return seen


class Runs:
    """Counts a model's ``session.run`` calls, failed ones included."""

    def __init__(self, model: Model) -> None:
        self.count = 0
        self._run = model.run
        model.run = self  # type: ignore[method-assign]

    def __call__(self, batch: Any) -> dict[str, np.ndarray]:
        self.count += 1
        return self._run(batch)


def _fragile_batch(pipe: Pipeline, values: Sequence[float], prefix: str = "f") -> None:
    for i, value in enumerate(values):
        pipe.submit(_inbound(json.dumps({"id": f"{prefix}{i}", "tensor": [value]}).encode()))


def test_a_failed_batch_is_bisected_not_run_again_request_by_request(
        tmp_path: Path, transport: RecordingTransport, ledger: Ledger,
        stop_after: list[Pipeline]) -> None:
    """One poisoned input in a batch of 16: run alone one by one, the batch would cost
    1 + 16 runs; split in halves it costs 1 + 2 x log2(16) = 9. Only the culprit is
    refused; the other 15 are answered and billed once."""
    from tests.models import fragile_model

    model = Model(fragile_model(tmp_path))
    runs = Runs(model)
    pipe, _ = _pipeline(model, transport, ledger, MaxBatchSize=16,
                              MaxQueueDelayMs=2000)
    stop_after.append(pipe)
    values = [float(i % 10) for i in range(16)]
    values[11] = 99.0
    _fragile_batch(pipe, values)
    transport.wait_answers(16)
    answers = _answers(transport)
    assert answers == {f"f{i}": ["InferenceFailed" if i == 11 else "result"]
                       for i in range(16)}
    assert runs.count <= 1 + 2 * 4
    assert ledger.pending == 15
    assert ledger.admit(10**6) == 10**6 - 15  # the culprit's room came back


def test_by_default_no_input_of_a_failed_batch_is_refused_for_want_of_runs(
        tmp_path: Path, transport: RecordingTransport, ledger: Ledger,
        stop_after: list[Pipeline]) -> None:
    """Bisection can need more runs than inputs (one culprit fourth of five takes six):
    the default budget covers the whole tree, so only the culprits are refused."""
    from tests.models import fragile_model

    model = Model(fragile_model(tmp_path))
    pipe, _ = _pipeline(model, transport, ledger, MaxBatchSize=5, MaxQueueDelayMs=2000)
    stop_after.append(pipe)
    _fragile_batch(pipe, [1.0, 2.0, 3.0, 99.0, 4.0])
    transport.wait_answers(5)
    assert _answers(transport) == {f"f{i}": ["InferenceFailed" if i == 3 else "result"]
                                   for i in range(5)}
    assert ledger.pending == 4


def test_a_failed_batch_spends_at_most_its_rerun_budget(
        tmp_path: Path, transport: RecordingTransport, ledger: Ledger,
        stop_after: list[Pipeline]) -> None:
    """Two runs allowed: the clean half is answered, the half that failed again is
    answered InferenceFailed without a run more, and nothing refused is billed."""
    from tests.models import fragile_model

    model = Model(fragile_model(tmp_path))
    runs = Runs(model)
    pipe, _ = _pipeline(model, transport, ledger, MaxBatchSize=8,
                        MaxQueueDelayMs=2000, MaxRerunsPerFailedBatch=2)
    stop_after.append(pipe)
    _fragile_batch(pipe, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 99.0])
    transport.wait_answers(8)
    answers = _answers(transport)
    assert answers == {f"f{i}": ["result" if i < 4 else "InferenceFailed"] for i in range(8)}
    assert runs.count == 1 + 2
    messages = [json.loads(body)["error"]["message"] for _, body in transport.errors]
    assert sum("MaxRerunsPerFailedBatch" in m for m in messages) == 4  # f4..f7 unresolved
    assert ledger.pending == 4
    assert ledger.admit(10**6) == 10**6 - 4


def test_a_model_failing_often_has_its_failed_batches_answered_whole(
        tmp_path: Path, transport: RecordingTransport, ledger: Ledger,
        stop_after: list[Pipeline]) -> None:
    """Past MaxFailedBatchesPerMinute, a failed batch is not run again at all: an
    attacker sending a poisoned input per batch costs one run per batch, not 1 + log N."""
    from tests.models import fragile_model

    model = Model(fragile_model(tmp_path))
    runs = Runs(model)
    pipe, _ = _pipeline(model, transport, ledger, MaxBatchSize=4,
                        MaxQueueDelayMs=2000, MaxFailedBatchesPerMinute=1)
    stop_after.append(pipe)
    _fragile_batch(pipe, [1.0, 99.0, 2.0, 3.0], "a")
    transport.wait_answers(4)
    first = runs.count
    assert first == 1 + 2 + 2  # the first failed batch was bisected
    _fragile_batch(pipe, [4.0, 5.0, 99.0, 6.0], "b")
    transport.wait_answers(8)
    answers = _answers(transport)
    assert answers == {**{f"a{i}": ["InferenceFailed" if i == 1 else "result"]
                          for i in range(4)},
                       **{f"b{i}": ["InferenceFailed"] for i in range(4)}}
    assert runs.count == first + 1
    messages = [json.loads(body)["error"]["message"] for _, body in transport.errors]
    assert sum("MaxFailedBatchesPerMinute" in m for m in messages) == 4
    assert ledger.pending == 3
    assert ledger.admit(10**6) == 10**6 - 3


class FailsOnceOnInferenceFailed(RecordingTransport):
    """A transport whose first InferenceFailed answer raises (a broken connection, say):
    the batch being isolated crashes after part of it was handed to the commit thread."""

    def __init__(self) -> None:
        super().__init__()
        self.raised = False

    def send_error(self, inbound: Inbound, body: bytes) -> None:
        if not self.raised and b"InferenceFailed" in body:
            self.raised = True
            raise ConnectionError("the connection dropped while answering")
        super().send_error(inbound, body)


def test_a_batch_crashing_after_part_of_it_was_handed_on_answers_each_input_once(
        tmp_path: Path, ledger: Ledger, stop_after: list[Pipeline]) -> None:
    """f0 and f1 are inferred and queued for their commit before answering f2 crashes
    the batch: they are answered (and billed) by the commit thread alone; f2 and f3 get
    InternalError, unbilled, and f3's admitted room is given back."""
    from tests.models import fragile_model

    transport = FailsOnceOnInferenceFailed()
    model = Model(fragile_model(tmp_path))
    pipe, _ = _pipeline(model, transport, ledger, MaxBatchSize=4, MaxQueueDelayMs=2000)
    stop_after.append(pipe)
    _fragile_batch(pipe, [1.0, 2.0, 99.0, 3.0])
    transport.wait_answers(4)
    assert pipe.drain(5)
    time.sleep(0.2)  # a second answer to any of them would have been sent by now
    assert transport.raised
    assert _answers(transport) == {"f0": ["result"], "f1": ["result"],
                                   "f2": ["InternalError"], "f3": ["InternalError"]}
    assert ledger.pending == 2
    assert ledger.admit(10**6) == 10**6 - 2  # no admitted room leaked
    assert len(pipe._flights) == 0


class RefusesHighDigits(FailsOnHighDigits):
    """A head whose answers for digits 5 and above are too large for the request."""

    name = "test-refuses-high-digits"

    def failure(self) -> Exception:
        return Refusal(ErrorCode.OUTPUT_TOO_LARGE, "this answer is too large")


class CrashingMeter(LedgerMeter):
    """A meter whose commit hits a bug (not a metering error): the commit thread's last
    resort answers what it has not answered yet."""

    def commit(self, spec: MeterSpec, usages: Sequence[Usage]) -> list[str]:
        self.release(len(usages))
        raise RuntimeError("a bug in the commit")


def test_an_answer_refused_while_shaping_is_not_answered_again_when_the_commit_crashes(
        transport: RecordingTransport, ledger: Ledger, tmp_path: Path,
        held_out: tuple[np.ndarray, np.ndarray], stop_after: list[Pipeline]) -> None:
    import shutil

    from edge_module.config import BUILTIN_MODELS

    register(RefusesHighDigits.name, RefusesHighDigits.build)
    shutil.copy(BUILTIN_MODELS / "digits.onnx", tmp_path / "large.onnx")
    descriptor = json.loads((BUILTIN_MODELS / "digits.json").read_text())
    descriptor["head"] = RefusesHighDigits.name
    (tmp_path / "large.json").write_text(json.dumps(descriptor))
    x, _ = held_out
    metrics = Metrics()
    pipe = Pipeline(Model(tmp_path / "large.onnx"), PipelineSettings(), transport, metrics,
                    CrashingMeter(ledger, metrics), top_k=1)
    pipe.start()
    stop_after.append(pipe)
    for pixels in x[:20]:
        pipe.submit(_inbound(digit_image(pixels)))
    transport.wait_answers(20)
    assert pipe.drain(5)
    time.sleep(0.2)  # a second answer would have been sent by now
    answers = [inbound for inbound, _ in transport.results + transport.errors]
    assert len(answers) == 20 and len({id(inbound) for inbound in answers}) == 20
    codes = [json.loads(body)["error"]["code"] for _, body in transport.errors]
    assert set(codes) == {"OutputTooLarge", "InternalError"}
    assert transport.results == [] and ledger.pending == 0


def test_a_redelivery_decoded_before_its_first_delivery_is_billed_once(
        digits: Model, transport: RecordingTransport, ledger: Ledger,
        held_out: tuple[np.ndarray, np.ndarray], stop_after: list[Pipeline]) -> None:
    """With several decode workers, the broker's DUP redelivery B of an unnamed QoS 1
    input A can be decoded first: B enters the flight first, A is the copy. A is not
    marked redelivered and carries no name, but it is the same delivery: one record."""
    x, _ = held_out
    pipe, metrics = _pipeline(digits, transport, ledger, MaxBatchSize=8,
                              MaxQueueDelayMs=500)
    stop_after.append(pipe)
    payload = digit_image(x[9])
    pipe.submit(_inbound(payload, key="42", redelivered=True))  # B, decoded first
    pipe.submit(_inbound(payload, key="42"))  # A
    transport.wait_answers(2)
    assert pipe.drain(5)
    assert len(transport.results) == 2 and transport.errors == []
    assert ledger.pending == 1
    assert _metric(metrics, "edge_module_replayed_messages_total") == 1


def test_the_same_packet_id_and_bytes_on_another_topic_is_other_work(
        digits: Model, transport: RecordingTransport, ledger: Ledger,
        held_out: tuple[np.ndarray, np.ndarray], stop_after: list[Pipeline]) -> None:
    """A broker the customer controls may send one payload with one packet id to two
    topics (two models, with topic routing) at once, even marked as a redelivery: each
    answer is billed. Only the same delivery on the same topic is a repeat."""
    x, _ = held_out
    pipe, _ = _pipeline(digits, transport, ledger, MaxBatchSize=8, MaxQueueDelayMs=500)
    stop_after.append(pipe)
    payload = digit_image(x[3])
    pipe.submit(_inbound(payload, key="5", source="em/in/a"))
    pipe.submit(_inbound(payload, key="5", source="em/in/b", redelivered=True))
    pipe.submit(_inbound(payload, key="5", source="em/in/a", redelivered=True))  # a repeat
    transport.wait_answers(3)
    assert pipe.drain(5)
    assert len(transport.results) == 3 and transport.errors == []
    assert ledger.pending == 2
