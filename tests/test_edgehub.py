"""The edgeHub transport with the real azure-iot-device SDK, through the fake edgeHub.

Each test runs its own fake edgeHub (TLS mosquitto on 127.0.0.x:8883, the
workload API on a unix socket, the twin/method responder) and the module as a
process started the way the IoT Edge runtime starts it: the IOTEDGE_*
environment and nothing else about the hub.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from simulator.billing import BillingSimulator
from simulator.datasets import digits_split
from simulator.edgehub import FakeEdgeHub, OutputMessage
from tests.support import Module, digit_png, ledger_records, wait_until


@pytest.fixture
def edgehub(tmp_path: Path) -> Iterator[FakeEdgeHub]:
    hub = FakeEdgeHub(tmp_path / "edgehub").start()
    yield hub
    hub.stop()


@pytest.fixture
def start_edge_module(tmp_path: Path, edgehub: FakeEdgeHub,
                      billing: BillingSimulator) -> Iterator[Callable[..., Module]]:
    started: list[Module] = []

    def start(*extra: str, env: dict[str, str] | None = None, wait_ready: bool = True,
              **kwargs: Any) -> Module:
        module = Module(tmp_path, 1, "Transport=edgehub", "EdgeHub:ReportedIntervalSeconds=1",
                        *extra, env=env if env is not None else edgehub.module_env(),
                        billing=billing.url, public_key=billing.public_key_b64, **kwargs)
        started.append(module)
        return module.start(wait_ready=wait_ready)

    yield start
    for module in started:
        module.stop()


def digits(n: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    _, x_test, _, y_test = digits_split()
    return x_test[offset:offset + n], y_test[offset:offset + n]


def image_body(pixels: np.ndarray, request_id: str | None = None) -> bytes:
    body: dict[str, Any] = {"image": base64.b64encode(digit_png(pixels)).decode()}
    if request_id is not None:
        body["id"] = request_id
    return json.dumps(body).encode()


def by_id(messages: list[OutputMessage]) -> dict[str, dict[str, Any]]:
    return {m.json()["id"]: m.json() for m in messages}


def test_inputs_come_back_on_results_with_labels_and_ids(
    start_edge_module: Callable[..., Module], edgehub: FakeEdgeHub
) -> None:
    module = start_edge_module()
    x, y = digits(60)
    for i, pixels in enumerate(x):
        edgehub.send_input("input", image_body(pixels), message_id=f"msg-{i}",
                           content_type="application/json")
    out = edgehub.wait_outputs("results", len(x))
    results = by_id(out)
    assert set(results) == {f"msg-{i}" for i in range(len(x))}  # id from the message id
    correct = sum(results[f"msg-{i}"]["results"][0]["label"] == str(label)
                  for i, label in enumerate(y))
    assert correct / len(y) >= 0.9
    sample = next(m for m in out if m.correlation_id == "msg-0")
    assert sample.content_type == "application/json"
    assert sample.content_encoding == "utf-8"
    assert sample.properties["inputName"] == "input"
    assert len({m.message_id for m in out}) == len(out)  # every answer has its own id
    assert sample.json()["model"]["name"] == "digits"
    assert module.metric("edge_module_results_published_total") == len(x)
    assert [m for m in edgehub.outputs if m.output == "errors"] == []


def test_correlation_id_is_carried_and_errors_go_to_errors(
    start_edge_module: Callable[..., Module], edgehub: FakeEdgeHub
) -> None:
    module = start_edge_module("EdgeHub:Inputs=images,vectors")
    edgehub.send_input("images", b"{not json", message_id="bad-1", correlation_id="corr-1")
    edgehub.send_input("elsewhere", b'{"tensor": [0]}', message_id="lost-1")
    errors = {m.json()["id"]: m for m in edgehub.wait_outputs("errors", 2)}
    assert errors["corr-1"].json()["error"]["code"] == "InvalidJson"
    assert errors["corr-1"].correlation_id == "corr-1"
    unknown = errors["lost-1"].json()["error"]
    assert unknown["code"] == "UnknownInput"
    assert "EdgeHub:Inputs" in unknown["message"]
    x, _ = digits(1)
    edgehub.send_input("vectors", image_body(x[0], "ok-1"))
    (result,) = edgehub.wait_outputs("results", 1)
    assert result.json()["id"] == "ok-1"
    assert ledger_records(module) == 1  # the result; neither error is billed


def test_a_twin_patch_changes_behaviour_live(
    start_edge_module: Callable[..., Module], edgehub: FakeEdgeHub
) -> None:
    module = start_edge_module()
    x, _ = digits(3)
    edgehub.send_input("input", image_body(x[0], "before"))
    (before,) = edgehub.wait_outputs("results", 1)
    assert len(before.json()["results"][0]["topK"]) == 3

    version = edgehub.patch_desired({"Model": {"TopK": 1, "ScoreThreshold": 0.0},
                                     "Log": {"Level": "debug"},
                                     "Metering": {"BatchSize": 7},
                                     "EdgeHub": {"Inputs": "input,second"}})
    reported = edgehub.wait_reported(
        lambda r: r.get("config", {}).get("desiredVersion") == version)
    config = reported["config"]
    assert config["status"] == "applied", config
    assert config["effective"]["Model"]["TopK"] == 1
    assert config["effective"]["Metering"]["BatchSize"] == 7
    assert config["effective"]["EdgeHub"]["Inputs"] == "input,second"
    edgehub.send_input("second", image_body(x[1], "after"))
    after = edgehub.wait_outputs("results", 2)[1].json()
    assert after["id"] == "after"
    assert len(after["results"][0]["topK"]) == 1
    wait_until(lambda: '"level": "debug"' in module.log_text() or
               '"level":"debug"' in module.log_text(), 10, "debug logging on")

    # Another model, selected by name, replaces the running one without a restart.
    version = edgehub.patch_desired({"Model": {"Name": "telemetry", "TopK": 2}})
    edgehub.wait_reported(lambda r: r.get("config", {}).get("desiredVersion") == version)
    assert edgehub.reported["config"]["status"] == "applied"
    hot = [85.0, 2.3, 49.0, 1.8, 7.1, 118.0, 54.0, 2950.0]
    edgehub.send_input("input", json.dumps({"id": "pump", "tensor": [hot]}).encode())
    pump = edgehub.wait_outputs("results", 3)[2].json()
    assert pump["model"]["name"] == "telemetry"
    assert pump["results"][0]["label"] == "overheating"
    edgehub.wait_reported(lambda r: r.get("model", {}).get("name") == "telemetry")

    # null removes a desired property: the started-with value comes back.
    version = edgehub.patch_desired({"Model": {"Name": None, "TopK": None}})
    edgehub.wait_reported(lambda r: r.get("config", {}).get("desiredVersion") == version)
    edgehub.send_input("input", image_body(x[2], "reverted"))
    reverted = edgehub.wait_outputs("results", 4)[3].json()
    assert reverted["model"]["name"] == "digits"
    assert len(reverted["results"][0]["topK"]) == 3


def test_an_invalid_patch_is_rejected_and_reported(
    start_edge_module: Callable[..., Module], edgehub: FakeEdgeHub
) -> None:
    module = start_edge_module()
    version = edgehub.patch_desired({"Model": {"TopK": 0, "Name": "no-such-model"},
                                     "Mqtt": {"Host": "elsewhere"},
                                     "Model_Typo": 1,
                                     "Log": {"Level": "warning"}})
    reported = edgehub.wait_reported(
        lambda r: r.get("config", {}).get("desiredVersion") == version)
    config = reported["config"]
    assert config["status"] == "partly applied"
    rejected = config["rejected"]
    assert "Model:TopK" in rejected and "greater than or equal to 1" in rejected
    assert "Model:Name" in rejected
    assert "Mqtt:Host: cannot change while the module runs" in rejected
    assert "Model_Typo" in rejected
    assert config["effective"]["Model"]["TopK"] == 3  # the old setting stays
    assert config["effective"]["Model"]["Name"] == "digits"
    assert config["effective"]["Log"]["Level"] == "warning"  # the good one applied
    x, _ = digits(1)
    edgehub.send_input("input", image_body(x[0], "still"))
    (result,) = edgehub.wait_outputs("results", 1)
    assert len(result.json()["results"][0]["topK"]) == 3
    assert module.metric("edge_module_twin_updates_total", 'outcome="partly applied"') >= 1

    # Fixing the desired properties clears the rejection.
    version = edgehub.patch_desired({"Model": {"TopK": 2, "Name": None}, "Mqtt": None,
                                     "Model_Typo": None})
    config = edgehub.wait_reported(
        lambda r: r.get("config", {}).get("desiredVersion") == version)["config"]
    assert config["status"] == "applied"
    assert "rejected" not in config


def test_desired_properties_set_before_start_apply_at_start(
    start_edge_module: Callable[..., Module], edgehub: FakeEdgeHub
) -> None:
    edgehub.desired = {"Model": {"TopK": 1}}
    start_edge_module()
    reported = edgehub.wait_reported(lambda r: "config" in r)
    assert reported["config"]["effective"]["Model"]["TopK"] == 1
    x, _ = digits(1)
    edgehub.send_input("input", image_body(x[0], "one"))
    (result,) = edgehub.wait_outputs("results", 1)
    assert len(result.json()["results"][0]["topK"]) == 1


def test_reported_properties_carry_state_and_are_rate_limited(
    start_edge_module: Callable[..., Module], edgehub: FakeEdgeHub, billing: BillingSimulator
) -> None:
    start_edge_module("EdgeHub:ReportedIntervalSeconds=3", "Metering:MaxDelaySeconds=0.2")
    reported = edgehub.wait_reported(lambda r: "apiStatus" in r and "model" in r)
    assert reported["apiStatus"] == "Valid"
    assert reported["grace"]["state"] == "online"
    assert len(reported["model"]["sha256"]) == 64
    assert set(reported["backlog"]) == {"pending", "quarantined"}
    # A steady stream changes the backlog all the time; patches stay at most one per 3 s.
    edgehub.reported_patches.clear()
    x, _ = digits(1)
    started = time.monotonic()
    while time.monotonic() - started < 7:
        edgehub.send_input("input", image_body(x[0]))
        time.sleep(0.02)
    elapsed = time.monotonic() - started
    status_patches = [p for p in edgehub.reported_patches if "config" not in p]
    assert 1 <= len(status_patches) <= elapsed / 3 + 1.5, status_patches
    text = json.dumps(edgehub.reported)
    assert "test-key" not in text and billing.url not in text  # no secrets, no endpoint


def test_direct_methods(
    start_edge_module: Callable[..., Module], edgehub: FakeEdgeHub, billing: BillingSimulator
) -> None:
    module = start_edge_module("Metering:MaxDelaySeconds=3600")  # nothing drains by itself
    x, _ = digits(5)
    for i, pixels in enumerate(x):
        edgehub.send_input("input", image_body(pixels, f"m{i}"))
    edgehub.wait_outputs("results", 5)

    status, body = edgehub.call_method("GetStatus")
    assert status == 200
    assert body["apiStatus"] == "Valid"
    assert body["backlog"]["pending"] == 5
    assert set(body) == set(module.status())  # the same body as GET /status

    status, body = edgehub.call_method("DrainNow", {"timeoutSeconds": 10})
    assert status == 200, body
    assert (body["uploaded"], body["pending"]) == (5, 0)
    assert len(billing.store.records()) == 5

    status, body = edgehub.call_method("ReloadModel")
    assert status == 200
    assert body["model"]["sha256"] == body["previous"]["sha256"]

    assert edgehub.call_method("NoSuchMethod")[0] == 404
    status, body = edgehub.call_method("DrainNow", {"timeoutSeconds": "soon"})
    assert status == 400 and "timeoutSeconds" in body["error"]
    status, body = edgehub.call_method("DrainNow", [1, 2])
    assert status == 400 and "JSON object" in body["error"]
    assert edgehub.call_method("GetStatus", {"extra": 1})[0] == 400
    assert module.metric("edge_module_method_calls_total",
                         'method="unknown",status="404"') == 1


def test_edgehub_restart_loses_nothing_and_bills_what_was_delivered(
    start_edge_module: Callable[..., Module], edgehub: FakeEdgeHub, billing: BillingSimulator
) -> None:
    module = start_edge_module("EdgeHub:KeepAlive=5", "EdgeHub:RetryIntervalSeconds=1",
                               "Metering:MaxDelaySeconds=0.5", "Log:Level=debug")
    x, _ = digits(40)
    for i in range(20):
        edgehub.send_input("input", image_body(x[i], f"a{i}"), message_id=f"a{i}")
    edgehub.wait_outputs("results", 20)

    # edgeHub restarts with answers in flight, and comes back two seconds later. It may
    # deliver again inputs whose acknowledgement it had not saved: they are answered
    # again, not billed again (the ledger knows their message id and payload).
    for i in range(20, 40):
        edgehub.send_input("input", image_body(x[i], f"a{i}"), message_id=f"a{i}")
    edgehub.stop_broker()
    wait_until(lambda: not module.ready(), 20, "module notices that edgeHub is gone")
    time.sleep(2)
    edgehub.restart_broker()
    module.wait_ready(30)
    for i in range(10):
        edgehub.send_input("input", image_body(x[i], f"b{i}"), message_id=f"b{i}")
    wait_until(lambda: {f"b{i}" for i in range(10)} <= set(by_id(edgehub.outputs)), 60,
               "inputs sent after the restart answered")
    # The module's reported properties are still read and written after the restart.
    version = edgehub.patch_desired({"Model": {"TopK": 2}})
    edgehub.wait_reported(lambda r: r.get("config", {}).get("desiredVersion") == version)

    # Every record billed is an answer delivered, and every answer delivered is billed.
    wait_until(lambda: module.metric("edge_module_answers_in_flight") == 0 and
               module.metric("edge_module_ledger_pending_records") == 0, 30,
               "answers acknowledged and usage uploaded")
    billed = len(billing.store.records())

    def delivered() -> set[str]:
        return {m.json()["id"] for m in edgehub.outputs if m.output == "results"}

    wait_until(lambda: len(delivered()) >= billed, 10, "acknowledged answers routed")
    assert {f"a{i}" for i in range(20)} <= delivered()
    assert billed == len(delivered()), (billed, sorted(delivered()))
    assert module.metric("edge_module_results_undelivered_total") == 0


def test_a_full_intake_answers_overloaded_and_drops_nothing(
    start_edge_module: Callable[..., Module], edgehub: FakeEdgeHub, billing: BillingSimulator
) -> None:
    module = start_edge_module("EdgeHub:IntakeQueue=1", "Pipeline:IntakeQueue=1",
                               "Pipeline:MaxBatchSize=1", "Pipeline:DecodeWorkers=1",
                               "Metering:MaxDelaySeconds=0.2")
    x, _ = digits(1)
    body = image_body(x[0])
    sent = 300
    for i in range(sent):
        edgehub.send_input("input", body, message_id=f"o{i}")
    wait_until(lambda: len({m.json()["id"] for m in edgehub.outputs}) >= sent, 60,
               "every input answered")
    answers = {m.json()["id"]: m for m in edgehub.outputs}
    assert set(answers) == {f"o{i}" for i in range(sent)}
    overloaded = [m for m in answers.values() if m.output == "errors"]
    assert overloaded, "the burst should have overflowed a one-message intake"
    assert all(m.json()["error"]["code"] == "Overloaded" for m in overloaded)
    assert all(m.json()["error"]["retryable"] is True for m in overloaded)
    results = sent - len(overloaded)
    wait_until(lambda: len(billing.store.records()) == results, 30, "results billed")
    assert module.metric("edge_module_errors_total", 'code="Overloaded"') == len(overloaded)


def test_connection_string_fallback_for_local_runs(
    start_edge_module: Callable[..., Module], edgehub: FakeEdgeHub
) -> None:
    module = start_edge_module("Log:Level=debug", env=edgehub.connection_string_env())
    x, y = digits(1)
    edgehub.send_input("input", image_body(x[0], "local"))
    (result,) = edgehub.wait_outputs("results", 1)
    assert result.json()["results"][0]["label"] == str(y[0])
    assert edgehub.workload.calls == []  # no workload API involved
    edgehub.kill_broker()  # the SDK logs its reconnection attempts
    wait_until(lambda: not module.ready(), 20, "module notices that edgeHub is gone")
    key = base64.b64encode(edgehub.key).decode()
    assert key not in module.log_text()
    assert all(line.startswith("{") for line in module.log_text().splitlines() if line)


def test_without_the_edge_environment_the_module_says_what_is_missing(
    tmp_path: Path, billing: BillingSimulator
) -> None:
    env = {k: "" for k in ("IOTEDGE_WORKLOADURI",)}
    module = Module(tmp_path, 1, "Transport=edgehub", env=env, billing=billing.url,
                    public_key=billing.public_key_b64)
    module.env = {k: v for k, v in module.env.items()
                  if not k.startswith("IOTEDGE_") and not k.startswith("EdgeHub")
                  and not k.startswith("EdgeModule")}
    module.start(wait_ready=False)
    assert module.process is not None
    assert module.process.wait(30) == 2
    text = module.log_text()
    assert "IOTEDGE_DEVICEID" in text and "EdgeHubConnectionString" in text


def test_the_workload_api_is_used_for_trust_and_signing(
    start_edge_module: Callable[..., Module], edgehub: FakeEdgeHub
) -> None:
    start_edge_module()
    paths = [path for _, path in edgehub.workload.calls]
    assert "/trust-bundle" in paths
    assert f"/modules/{edgehub.module_id}/genid/{edgehub.generation_id}/sign" in paths


def test_edgehub_recreated_without_its_store_gets_subscribed_again(
    start_edge_module: Callable[..., Module], edgehub: FakeEdgeHub
) -> None:
    module = start_edge_module("EdgeHub:RetryIntervalSeconds=1")
    x, _ = digits(1)
    edgehub.send_input("input", image_body(x[0], "first"))
    edgehub.wait_outputs("results", 1)
    edgehub.kill_broker()
    wait_until(lambda: not module.ready(), 20, "module notices that edgeHub is gone")
    edgehub.restart_broker(forget_sessions=True)  # every subscription forgotten
    module.wait_ready(30)
    sent = 0

    def answered() -> bool:
        nonlocal sent
        edgehub.send_input("input", image_body(x[0], f"probe-{sent}"))
        sent += 1
        return len(edgehub.wait_outputs("results", 1)) >= 1 and any(
            m.json()["id"].startswith("probe-") for m in edgehub.outputs)

    wait_until(answered, 30, "an input answered after edgeHub lost its sessions")
    status, _ = edgehub.call_method("GetStatus")  # methods subscribed again too
    assert status == 200


def test_a_module_restart_under_load_answers_every_input_once_billed(
    start_edge_module: Callable[..., Module], edgehub: FakeEdgeHub, billing: BillingSimulator
) -> None:
    first = start_edge_module("Metering:MaxDelaySeconds=0.2")
    x, _ = digits(1)
    body = image_body(x[0])
    sent = 300
    for i in range(sent):
        edgehub.send_input("input", body, message_id=f"r{i}")
        if i == 100:
            first.stop()  # SIGTERM with inputs queued in edgeHub and in flight in the module
            assert first.process is not None and first.process.returncode == 0
    second = start_edge_module("Metering:MaxDelaySeconds=0.2")

    def answered() -> set[str]:
        return {m.json()["id"] for m in edgehub.outputs}

    wait_until(lambda: len(answered()) >= sent, 60, "every input answered")
    assert answered() == {f"r{i}" for i in range(sent)}
    results = {m.json()["id"] for m in edgehub.outputs if m.output == "results"}
    refused = {m.json()["id"]: m.json()["error"]["code"] for m in edgehub.outputs
               if m.output == "errors"}
    assert set(refused.values()) <= {"ShuttingDown"}
    assert not results & set(refused)  # each input answered one way
    wait_until(lambda: second.metric("edge_module_ledger_pending_records") == 0, 30,
               "usage uploaded")
    # Inputs refused while shutting down were answered, not billed; the rest billed once.
    assert len(billing.store.records()) == len(results)


def test_a_model_repository_over_edgehub_routes_by_field_reports_states_and_reloads(
    tmp_path: Path, start_edge_module: Callable[..., Module], edgehub: FakeEdgeHub,
) -> None:
    from tests.fast.test_repository import TELEMETRY_ROW, add_version

    root = tmp_path / "repository"
    add_version(root, "digits", 1)
    add_version(root, "telemetry", 1)
    start_edge_module(f"Model:Repository={root}", "Model:Default=digits",
                      "Model:RepositoryPollSeconds=0", "EdgeHub:Inputs=input,pump",
                      "EdgeHub:InputModels=pump=telemetry:1")
    x, _ = digits(1)
    edgehub.send_input("input", image_body(x[0], "d"))
    edgehub.send_input("input", json.dumps({"id": "t", "model": "telemetry",
                                            "tensor": TELEMETRY_ROW}).encode())
    edgehub.send_input("pump", json.dumps({"id": "p", "tensor": TELEMETRY_ROW}).encode())
    results = by_id(edgehub.wait_outputs("results", 3))
    assert results["d"]["model"]["name"] == "digits"
    assert results["t"]["model"]["name"] == "telemetry"
    assert results["p"]["model"] == {**results["t"]["model"], "version": "1"}
    reported = edgehub.wait_reported(lambda r: "models" in r and "telemetry" in r["models"])
    assert reported["models"]["telemetry"]["1"]["state"] == "ready"

    status, body = edgehub.call_method("UnloadModel", {"model": "telemetry"})
    assert status == 200 and [m["state"] for m in body["models"]] == ["unloaded"]
    edgehub.send_input("input", json.dumps({"id": "u", "model": "telemetry",
                                            "tensor": TELEMETRY_ROW}).encode())
    errors = by_id(edgehub.wait_outputs("errors", 1))
    assert errors["u"]["error"]["code"] == "UnknownModel"
    edgehub.wait_reported(
        lambda r: r.get("models", {}).get("telemetry", {}).get("1", {}).get("state")
        == "unloaded")

    # a new digits version written while serving, loaded on request (no polling here)
    add_version(root, "digits", 2)
    status, body = edgehub.call_method("ReloadModel", {"model": "digits", "version": "2"})
    assert status == 200 and body["models"][0]["state"] == "ready", body
    status, body = edgehub.call_method("ReloadModel", {"model": "telemetry"})
    assert status == 200 and [m["state"] for m in body["models"]] == ["ready"]
    assert edgehub.call_method("ReloadModel", {"model": "absent"})[0] == 404
    assert edgehub.call_method("ReloadModel", {"version": "1"})[0] == 400
    assert edgehub.call_method("UnloadModel", {})[0] == 400
    edgehub.send_input("input", image_body(x[0], "d2"))
    results = by_id(edgehub.wait_outputs("results", 4))
    assert results["d2"]["model"]["version"] == "2"
    # version 1, retired, leaves the reported properties (a null in the merge patch)
    edgehub.wait_reported(lambda r: set(r.get("models", {}).get("digits", {})) == {"2"})

    # the twin chooses the default model; Model:Name does not apply to a repository
    version = edgehub.patch_desired({"Model": {"Default": "telemetry", "Name": "telemetry"}})
    config = edgehub.wait_reported(
        lambda r: r.get("config", {}).get("desiredVersion") == version)["config"]
    assert config["status"] == "partly applied" and "Model:Name" in config["rejected"]
    edgehub.send_input("input", json.dumps({"id": "t2", "tensor": TELEMETRY_ROW}).encode())
    results = by_id(edgehub.wait_outputs("results", 5))
    assert results["t2"]["model"]["name"] == "telemetry"
    version = edgehub.patch_desired({"Model": {"Default": "absent"}})
    config = edgehub.wait_reported(
        lambda r: r.get("config", {}).get("desiredVersion") == version)["config"]
    assert config["status"] == "rejected" and "absent" in config["rejected"]
