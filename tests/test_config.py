"""Settings: names, sources, precedence, validation, and the generated reference page."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_module.config import all_keys, load_settings, reference_markdown
from edge_module.exceptions import ConfigError

REPO = Path(__file__).resolve().parent.parent
BASE = ["Eula=accept", "Billing=https://billing.example.test/", "ApiKey=k-123-test-key-456"]


def test_keys_are_case_insensitive_and_nested_with_colons() -> None:
    s = load_settings(["eula=ACCEPT", "BILLING=https://b.test", "apikey=x-test-key-0123456",
                       "mqtt:HOST=h",
                       "Mqtt:Tls:Insecure=true"], environ={})
    assert s.eula == "accept" and s.mqtt.host == "h" and s.mqtt.tls.insecure is True


def test_environment_uses_double_underscores_and_ignores_foreign_variables() -> None:
    env = {"Mqtt__Port": "1999", "EULA": "accept", "Billing": "https://b.test",
           "ApiKey": "x-test-key-0123456", "PATH": "/bin", "HOME": "/root", "MODEL": "not ours"}
    s = load_settings([], environ=env)
    assert s.mqtt.port == 1999


def test_precedence_command_line_over_environment_over_file(tmp_path: Path) -> None:
    file = tmp_path / "settings.json"
    file.write_text(json.dumps({"Mqtt": {"Host": "from-file", "Port": 1001},
                                "model": {"topk": 5}, "Log": {"Level": "debug"}}))
    s = load_settings([*BASE, "Mqtt:Port=1003"], environ={"Mqtt__Host": "from-env",
                                                         "Mqtt__Port": "1002"},
                      config_file=file)
    assert (s.mqtt.host, s.mqtt.port, s.model.top_k, s.log.level) == \
        ("from-env", 1003, 5, "debug")


def test_toml_config_file(tmp_path: Path) -> None:
    file = tmp_path / "settings.toml"
    file.write_text('Eula = "accept"\nBilling = "https://b.test"\nApiKey = "k-test-key-0123456"\n'
                    '[Mqtt]\nInputTopic = "a/#,b/+"\n')
    s = load_settings([], environ={}, config_file=file)
    assert s.mqtt.input_topic == ["a/#", "b/+"]


@pytest.mark.parametrize(
    ("args", "key", "hint"),
    [
        ([], "Eula", "Eula=accept"),
        (["Eula=no", *BASE[1:]], "Eula", "Eula=accept"),
        ([*BASE[:1], "Billing=not a url", *BASE[2:]], "Billing", "Billing=https://"),
        ([*BASE, "Mqtt:Hots=x"], "Mqtt:Hots", "did you mean Mqtt:Host"),
        ([*BASE, "Model:Path=/no/such.onnx"], "Model:Path", "does not exist"),
        ([*BASE, "Model:Name=nosuch"], "Model:Name", "built-ins: digits, telemetry"),
        ([*BASE, "Mqtt:Port=70000"], "Mqtt:Port", "less than or equal to 65535"),
        ([*BASE, "Mqtt:Qos=2"], "Mqtt:Qos", "less than or equal to 1"),
        ([*BASE, "Mqtt:ResultTopic=edge-module/input/x"], "Mqtt:ResultTopic",
         "consume its own output"),
        ([*BASE, "Mqtt:InputTopic=a/#/b"], "Mqtt:InputTopic", "'#' must be"),
        ([*BASE, "Mqtt:Tls:CaFile=/no/ca.pem"], "Mqtt:Tls:CaFile", "does not exist"),
        ([*BASE, "Mqtt:Tls:CertFile=/etc/hostname"], "Mqtt:Tls:KeyFile",
         "fix: set both Mqtt:Tls:CertFile and Mqtt:Tls:KeyFile"),
        ([*BASE, "Replicas=2", "Transport=edgehub"], "Replicas", "fix: use Replicas=1"),
        ([*BASE, "Transport=kafka"], "Transport", "mqtt"),
        ([*BASE, "NoEquals"], "NoEquals", "Key=Value"),
    ],
)
def test_bad_settings_name_the_key_and_the_fix(args: list[str], key: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(args, environ={})
    assert info.value.key == key
    assert hint in str(info.value)


def test_secret_values_are_never_echoed_in_errors() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings([*BASE[:2], "ApiKey=   "], environ={})
    assert info.value.key == "ApiKey"
    s = load_settings([*BASE, "Mqtt:Password=hunter2"], environ={})
    assert "hunter2" not in repr(s) and "k-123-test-key-456" not in repr(s)
    assert "hunter2" not in json.dumps(s.model_dump(mode="json"))


def test_cli_bad_config_prints_one_line_and_exits_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "edge_module", "run", "Eula=accept", "ApiKey=sekrit-value-0123456",
         "Billing=ftp://x"], capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("configuration error: Billing:")
    assert "sekrit-value-0123456" not in proc.stderr + proc.stdout


def test_cli_accepts_settings_without_the_run_word() -> None:
    proc = subprocess.run([sys.executable, "-m", "edge_module", "Eula=nope"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Eula" in proc.stderr


def test_configuration_reference_page_matches_the_code() -> None:
    page = (REPO / "docs" / "configuration.md").read_text()
    assert page == reference_markdown(), "run `make docs` to regenerate docs/configuration.md"
    for key in all_keys():
        assert f"`{key}`" in page


def test_argument_errors_never_echo_secret_values() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "edge_module", "ledger", "--bogus", "ApiKey=very-secret-1",
         "Mqtt:Password=very-secret-2", "--drain", "--nope", "Mqtt__password=very-secret-3"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "unrecognized arguments" in proc.stderr
    assert "very-secret" not in proc.stderr + proc.stdout


def test_a_short_api_key_is_refused_with_the_minimum_and_exit_2() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings([*BASE[:2], "ApiKey=short-key"], environ={})
    assert info.value.key == "ApiKey"
    assert "9 characters" in str(info.value) and "at least 16" in str(info.value)
    assert "short-key" not in str(info.value)
    load_settings([*BASE[:2], "ApiKey=" + "k" * 16], environ={})  # the minimum is accepted
    proc = subprocess.run(
        [sys.executable, "-m", "edge_module", "run", "Eula=accept", "ApiKey=x",
         "Billing=https://billing.example.test/"], capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith("configuration error: ApiKey: is 1 characters long")


def test_run_help_lists_the_required_settings_and_points_to_the_reference() -> None:
    proc = subprocess.run([sys.executable, "-m", "edge_module", "run", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for required in ("Eula=accept", "Billing=<url>", "ApiKey=<key>", "Mounts:License",
                     "edge-module config-reference", "docs/configuration.md"):
        assert required in proc.stdout, required


def test_grpc_is_on_by_default_on_8001_and_each_replica_gets_its_own_ports() -> None:
    from edge_module.replicas import replica_args

    settings = load_settings(BASE, environ={})
    assert (settings.grpc.enabled, settings.grpc.port, settings.http.port) == (True, 8001, 5000)
    assert not load_settings([*BASE, "Grpc:Enabled=false"], environ={}).grpc.enabled
    ports = [{a.partition("=")[0]: a.partition("=")[2] for a in replica_args(settings, i)}
             for i in range(3)]
    assert [(p["Http:Port"], p["Grpc:Port"]) for p in ports] == [
        ("5000", "8001"), ("5001", "8002"), ("5002", "8003")]
    free = load_settings([*BASE, "Http:Port=0", "Grpc:Port=0"], environ={})
    assert {replica_args(free, 1)[2], replica_args(free, 1)[3]} == {"Http:Port=0", "Grpc:Port=0"}
