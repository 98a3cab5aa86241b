"""The edgeHub transport's outbox, in process: acknowledgements, resends, give-up, overflow.

The real SDK against the fake edgeHub is tested in tests/test_edgehub.py; here a
stand-in for the SDK client decides, per attempt, whether edgeHub acknowledges,
fails or never answers, so each rule of the outbox is checked exactly and fast.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from azure.iot.device import Message

from edge_module.config import EdgeHubSettings
from edge_module.metrics import Metrics
from edge_module.transport.base import Inbound
from edge_module.transport.edgehub import EdgeHubTransport
from tests.support import wait_until

Callback = Callable[..., None]
TAKEN = threading.Event()


class StandInPipeline:
    """The SDK's MQTT pipeline as the outbox sees it: each send gets a verdict."""

    def __init__(self) -> None:
        self.verdicts: list[str] = []  # "ack", "fail" or "silent", used in order
        self.sent: list[tuple[Message, Callback]] = []
        self.feature_enabled: dict[str, bool] = {}
        self.lock = threading.Lock()

    def send_output_message(self, message: Message, callback: Callback) -> None:
        with self.lock:
            verdict = self.verdicts.pop(0) if self.verdicts else "ack"
            self.sent.append((message, callback))
        if verdict == "ack":
            callback()
        elif verdict == "fail":
            callback(error=ConnectionError("edgeHub went away"))


class StandInClient:
    def __init__(self) -> None:
        self._mqtt_pipeline = StandInPipeline()
        self.connected = True
        self.on_message_received: Any = None
        self.on_twin_desired_properties_patch_received: Any = None
        self.on_method_request_received: Any = None
        self.on_connection_state_change: Any = None

    def connect(self) -> None:
        return None

    def get_twin(self) -> dict[str, Any]:
        return {"desired": {}}

    def shutdown(self) -> None:
        return None


class Settled:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
def hub() -> Iterator[tuple[EdgeHubTransport, StandInClient, Metrics]]:
    client = StandInClient()
    metrics = Metrics()
    settings = EdgeHubSettings.model_validate({
        "SendTimeoutSeconds": 0.3, "SendRetrySeconds": 2, "IntakeQueue": 2,
        "Inputs": ["input1"]})
    transport = EdgeHubTransport(settings, metrics, client_factory=lambda _: client)  # type: ignore[arg-type, return-value]
    release = threading.Event()

    def deliver(inbound: Inbound) -> None:  # a pipeline that takes one input and blocks
        TAKEN.set()
        release.wait()

    TAKEN.clear()
    transport.start(deliver)
    yield transport, client, metrics
    release.set()
    transport.close(0.5)


def _value(metrics: Metrics, name: str) -> float:
    for line in metrics.render().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def test_an_acknowledged_answer_settles_its_input_once(hub: Any) -> None:
    transport, client, _ = hub
    settled = Settled()
    transport.send_result(Inbound(b"x", "input1", correlation_id="c1", settle=settled), b"{}")
    assert settled.count == 1
    message, _ = client._mqtt_pipeline.sent[0]
    assert message.output_name == "results" and message.correlation_id == "c1"
    assert message.custom_properties["inputName"] == "input1"


def test_a_failed_send_is_resent_and_settles_once(hub: Any) -> None:
    transport, client, metrics = hub
    client._mqtt_pipeline.verdicts = ["fail", "fail", "ack"]
    settled = Settled()
    transport.send_error(Inbound(b"x", "input1", settle=settled), b"{}")
    wait_until(lambda: settled.count == 1, 10, "the third attempt to be acknowledged")
    assert len(client._mqtt_pipeline.sent) == 3
    assert _value(metrics, "edge_module_send_retries_total") == 2
    time.sleep(0.4)
    assert settled.count == 1


def test_an_unanswered_send_is_resent_and_a_late_old_ack_is_ignored(hub: Any) -> None:
    transport, client, _ = hub
    client._mqtt_pipeline.verdicts = ["silent", "silent"]
    settled = Settled()
    transport.send_result(Inbound(b"x", "input1", settle=settled), b"{}")
    wait_until(lambda: len(client._mqtt_pipeline.sent) >= 2, 5, "a resend after the timeout")
    _, first_callback = client._mqtt_pipeline.sent[0]
    first_callback()  # edgeHub acknowledges the superseded attempt late
    assert settled.count == 0
    _, latest_callback = client._mqtt_pipeline.sent[-1]
    latest_callback()
    assert settled.count == 1


def test_an_answer_never_acknowledged_is_given_up_counted_and_settled(hub: Any) -> None:
    transport, client, metrics = hub
    client._mqtt_pipeline.verdicts = ["fail"] * 100
    settled = Settled()
    transport.send_result(Inbound(b"x", "input1", settle=settled), b"{}")
    wait_until(lambda: settled.count == 1, 10, "the give-up after SendRetrySeconds")
    assert _value(metrics, "edge_module_results_undelivered_total") == 1


def test_inputs_past_a_full_intake_are_answered_overloaded(hub: Any) -> None:
    transport, client, metrics = hub
    for n in range(6):
        message = Message(b"payload", message_id=f"m{n}")  # type: ignore[no-untyped-call]
        message.input_name = "input1"
        transport._on_message(message)
        if n == 0:
            assert TAKEN.wait(5), "the first input reaches the pipeline"
    errors = [m for m, _ in client._mqtt_pipeline.sent if m.output_name == "errors"]
    # one input taken by the (blocked) pipeline, two queued, the rest refused
    assert len(errors) == 3
    assert all(b"Overloaded" in m.data for m in errors)
    assert _value(metrics, 'edge_module_errors_total{code="Overloaded"}') == 3


def test_an_input_nobody_serves_is_answered_unknown_input(hub: Any) -> None:
    transport, client, _ = hub
    message = Message(b"payload", message_id="m1")  # type: ignore[no-untyped-call]
    message.input_name = "elsewhere"
    transport._on_message(message)
    [(answer, _)] = client._mqtt_pipeline.sent
    assert answer.output_name == "errors" and b"UnknownInput" in answer.data
