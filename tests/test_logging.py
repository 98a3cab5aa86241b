"""Logs: JSON lines, the IoT Edge severity prefix, and secrets scrubbed everywhere."""

from __future__ import annotations

import io
import json
from collections.abc import Callable

from edge_module import logs
from tests.support import Collector, Module


def test_json_lines_and_redaction_of_fields_and_values() -> None:
    stream = io.StringIO()
    logs.register_secrets(["s3cr3t-value"])
    logs.configure("info", "json", stream)
    log = logs.get_logger("t")
    log.info("event_one", api_key="abc", detail="token s3cr3t-value leaked?", nested={
        "password": "p", "ok": 1})
    log.debug("hidden")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["event"] == "event_one" and record["level"] == "info"
    assert record["api_key"] == "***" and record["nested"] == {"password": "***", "ok": 1}
    assert "s3cr3t-value" not in lines[0]


def test_iotedge_format_prefixes_syslog_severity() -> None:
    stream = io.StringIO()
    logs.configure("debug", "iotedge", stream)
    log = logs.get_logger("t")
    log.info("a")
    log.warning("b")
    log.error("c")
    prefixes = [line.split(" ", 1)[0] for line in stream.getvalue().splitlines()]
    assert prefixes == ["<6>", "<4>", "<3>"]
    json.loads(stream.getvalue().splitlines()[0].split(" ", 1)[1])


def test_running_module_never_logs_or_serves_its_secrets(
    start_module: Callable[..., Module], collector: Collector
) -> None:
    module = start_module("Mqtt:Username=user", "Mqtt:Password=broker-pass-987",
                          "Log:Level=debug")
    collector.publish("em/in/x", b"{bad json")
    collector.wait("em/errors", 1)
    surfaces = [module.log_text(), module.http("/metrics")[1].decode(),
                module.http("/ready")[1].decode()]
    surfaces += [m.payload.decode(errors="replace") for m in collector.messages]
    for text in surfaces:
        assert "test-api-key-1234567890" not in text
        assert "broker-pass-987" not in text
    assert '"module_started"' in module.log_text()


def test_scrubbing_masks_whole_secret_values_and_leaves_words_alone() -> None:
    stream = io.StringIO()
    logs.register_secrets(["x", "fi", "pro", "Zq9-long-enough-secret"])  # short ones ignored
    logs.configure("info", "json", stream)
    log = logs.get_logger("t")
    log.info("proxy_file_fix", detail="proxy file fix exit",
             url="https://u:Zq9-long-enough-secret@host/", glued="aZq9-long-enough-secretb")
    record = json.loads(stream.getvalue())
    assert record["detail"] == "proxy file fix exit"  # not pro***y, ***le, ***
    assert record["url"] == "https://u:***@host/"
    assert record["glued"] == "aZq9-long-enough-secretb"  # part of another value: not it
    assert logs.scrub("x fi pro") == "x fi pro"
