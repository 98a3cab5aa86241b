"""Live settings, direct-method payloads, reported-property rate limits, and two fixes
the edgeHub work needed (paho's TLS errors, loggers following a live level change)."""

from __future__ import annotations

import io
import json
import ssl
import threading
import time
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edge_module import logs
from edge_module.config import load_settings
from edge_module.control.live import LiveSettings
from edge_module.control.methods import BadPayload, Methods, options
from edge_module.control.reported import Reporter
from edge_module.envelope import result_envelope
from edge_module.inference.heads.classification import shape_results
from edge_module.inference.models import Provenance
from edge_module.transport.paho_fix import apply as apply_paho_fix

BASE = ["Eula=accept", "Billing=http://127.0.0.1:9/", "ApiKey=k-test-key-0123456"]


def live() -> LiveSettings:
    return LiveSettings(load_settings(BASE, environ={}))


def test_desired_properties_use_setting_names_case_insensitively() -> None:
    settings = live()
    verdict = settings.update({"model": {"topk": 5}, "LOG": {"level": "DEBUG"},
                               "$version": 4}, full=True)
    assert verdict.rejected == {}
    assert verdict.version == 4
    assert sorted(verdict.changed) == ["Log:Level", "Model:TopK"]
    assert verdict.settings.model.top_k == 5 and verdict.settings.log.level == "debug"


def test_each_bad_property_is_rejected_alone_with_its_reason() -> None:
    settings = live()
    verdict = settings.update({"Model": {"TopK": 500, "ScoreThreshold": 0.5},
                               "Http": {"Port": 1}, "Nope": 1}, full=True)
    assert set(verdict.rejected) == {"Model:TopK", "Http:Port", "Nope"}
    assert "less than or equal to 100" in verdict.rejected["Model:TopK"]
    assert "restart" in verdict.rejected["Http:Port"]
    assert "unknown setting" in verdict.rejected["Nope"]
    assert verdict.settings.model.top_k == 3  # the old value stays
    assert verdict.settings.model.score_threshold == 0.5  # the good one next to it applies


def test_patches_merge_and_null_brings_back_the_started_with_value() -> None:
    settings = live()
    settings.current = settings.update({"Model": {"TopK": 5}}, full=True).settings
    patched = settings.update({"EdgeHub": {"Inputs": "a, b"}}, full=False)
    assert patched.settings.model.top_k == 5  # kept from the earlier document
    assert patched.settings.edge_hub.inputs == ["a", "b"]
    settings.current = patched.settings
    assert settings.effective()["EdgeHub"]["Inputs"] == "a,b"
    reverted = settings.update({"Model": {"TopK": None}}, full=False)
    assert reverted.settings.model.top_k == 3
    assert reverted.changed == ["Model:TopK"]


def test_method_payloads_are_checked() -> None:
    table = Methods()
    table.add("Echo", lambda payload: (200, options(payload, {"n": int})))
    assert table.call("echo", {"n": 1}) == (200, {"n": 1})
    assert table.call("Echo", None) == (200, {})
    assert table.call("Echo", {"n": "1"})[0] == 400
    assert table.call("Echo", {"m": 1})[0] == 400
    assert table.call("Echo", [1])[0] == 400
    status, body = table.call("Other", None)
    assert status == 404 and body["methods"] == ["Echo"]
    with pytest.raises(BadPayload):
        options({"n": True}, {"n": int})  # a bool is not a number here


def test_reported_properties_go_out_on_change_at_most_every_interval() -> None:
    sent: list[dict[str, Any]] = []
    counter = {"n": 0}

    def snapshot() -> dict[str, Any]:
        counter["n"] += 1  # changes at every sample
        return {"backlog": counter["n"], "model": "m"}

    reporter = Reporter(lambda p: sent.append(p) is None, snapshot, interval=1.0)
    reporter.start()
    reporter.push({"config": {"status": "applied"}})
    time.sleep(3.2)
    reporter.stop()
    status = [p for p in sent if "config" not in p]
    assert sent[0] == {"config": {"status": "applied"}} or sent[1] == {
        "config": {"status": "applied"}}
    assert 3 <= len(status) <= 5
    assert all("model" not in p for p in status[1:])  # only what changed is sent again


def test_score_threshold_leaves_out_unsure_classes() -> None:
    scores = np.array([[0.6, 0.3, 0.1], [0.4, 0.35, 0.25]], dtype=np.float32)
    results = shape_results(scores, ["a", "b", "c"], 3, score_threshold=0.5)
    body = json.loads(result_envelope("r", Provenance("m", "1", "0" * 64), results, {}))
    first, second = body["results"]
    assert first["label"] == "a" and [r["label"] for r in first["topK"]] == ["a"]
    assert second["label"] is None and second["topK"] == [] and second["score"] == 0.4


def test_a_tls_error_on_the_socket_is_a_lost_connection_not_a_dead_thread() -> None:
    apply_paho_fix()

    class BrokenTls:
        def send(self, _: bytes) -> int:
            raise ssl.SSLEOFError(8, "EOF occurred in violation of protocol")

        def recv(self, _: int) -> bytes:
            raise ssl.SSLError(1, "bad record mac")

        def close(self) -> None:
            return None

    client = mqtt.Client()
    client._sock = BrokenTls()
    with pytest.raises(ConnectionError):
        client._sock_send(b"x")
    with pytest.raises(ConnectionError):
        client._sock_recv(1)


def test_loggers_created_before_configure_follow_a_live_level_change() -> None:
    log = logs.get_logger("early")
    stream = io.StringIO()
    try:
        logs.configure("info", "json", stream)
        log.debug("hidden")
        logs.configure("debug", "json", stream)
        thread = threading.Thread(target=lambda: log.debug("shown"))
        thread.start()
        thread.join()
    finally:
        logs.configure("info", "json")
    lines = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert lines == ["shown"]


def test_replicas_are_refused_with_edgehub() -> None:
    from edge_module.exceptions import ConfigError

    with pytest.raises(ConfigError, match=r"Replicas: .*Transport=edgehub"):
        load_settings([*BASE, "Transport=edgehub", "Replicas=2"], environ={})
