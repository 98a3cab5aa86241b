"""Disconnected mode: licence download, licence states, usage logs, verify, reconcile."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_module.trust.signing import sign
from simulator.billing import BillingSimulator, KeyInfo
from tests.support import API_KEY, Collector, Module, wait_until

RESULTS, ERRORS = "em/results", "em/errors"


def edge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_module", *args], capture_output=True,
                          text=True, timeout=60)


def download(tmp: Path, billing: BillingSimulator, key: str = API_KEY) -> Path:
    proc = edge("run", "Eula=accept", f"Billing={billing.url}", f"ApiKey={key}",
                "DownloadLicense=True", f"Mounts:License={tmp / 'license'}",
                f"Data:Path={tmp / 'data'}")
    assert proc.returncode == 0, proc.stderr
    path = tmp / "license" / "edge-module.license"
    assert path.exists() and "licence written" in proc.stdout
    return path


def disconnected(start_module: Callable[..., Module], tmp: Path, billing: BillingSimulator,
                 **kwargs: object) -> Module:
    return start_module(f"Mounts:License={tmp / 'license'}", f"Mounts:Output={tmp / 'out'}",
                        billing=None, public_key=billing.public_key_b64, **kwargs)


def tensor(i: int, items: int = 1) -> bytes:
    return json.dumps({"id": f"d{i}", "items": [{"tensor": [[[0.1] * 8] * 8]}] * items}).encode()


def test_disconnected_run_end_to_end_with_signed_usage_logs(
    start_module: Callable[..., Module], collector: Collector, billing: BillingSimulator,
    tmp_path: Path,
) -> None:
    lic = download(tmp_path, billing)
    module = disconnected(start_module, tmp_path, billing)
    status = module.status()
    assert status["mode"] == "disconnected" and status["apiStatus"] == "Valid"
    assert status["grace"]["remainingSeconds"] > 29 * 86400  # the licence's 30 days
    for i in range(10):
        collector.publish("em/in/x", tensor(i, items=1 + i % 3))
    collector.wait(RESULTS, 10)
    quantity = sum(1 + i % 3 for i in range(10))
    code, body = module.http("/records/usage-logs/")
    assert code == 200
    months = json.loads(body)["usageLogs"]
    assert len(months) == 1
    code, body = module.http(months[0]["url"])
    log = json.loads(body)
    assert log["apiType"] == "image-classification" and log["serviceName"] == "edge-module"
    assert log["meters"] == [{"name": "digits.image.classify", "quantity": quantity}]
    assert billing.totals()["records"] == 0  # nothing left the device
    module.signal(signal.SIGTERM)
    assert module.wait_exit() == 0
    out = tmp_path / "out"
    verified = edge("usage-log", "verify", str(out), "--license", str(lic), "--json")
    assert verified.returncode == 0, verified.stdout
    assert json.loads(verified.stdout)["quantity"] == {"digits.image.classify": quantity}
    # The vendor reconciles the log once a link exists.
    reconciled = edge("reconcile", f"Mounts:Output={out}", f"Billing={billing.url}",
                      f"ApiKey={API_KEY}")
    assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr
    answer = json.loads(reconciled.stdout)
    assert answer["verified"] is True
    assert answer["quantity"] == {"digits.image.classify": quantity}
    # Editing one quantity breaks the chain.
    log_file = next((out / "usage-logs").glob("*.jsonl"))
    lines = log_file.read_text().splitlines()
    entry = json.loads(lines[0])
    entry["meters"][0]["quantity"] -= 1
    lines[0] = json.dumps(entry)
    log_file.write_text("\n".join(lines) + "\n")
    tampered = edge("usage-log", "verify", str(out), "--license", str(lic))
    assert tampered.returncode == 1 and "TAMPERED" in tampered.stdout
    assert "edited" in tampered.stdout
    rejected = edge("reconcile", f"Mounts:Output={out}", f"Billing={billing.url}",
                    f"ApiKey={API_KEY}")
    assert rejected.returncode == 1 and '"verified": false' in rejected.stdout


def test_missing_license_mount_gives_the_azure_message(tmp_path: Path,
                                                      billing: BillingSimulator) -> None:
    proc = edge("run", "Eula=accept", f"Mounts:License={tmp_path / 'nothing-here'}",
                f"Development:TrustedKeyFile={billing.public_key_path}",
                f"Data:Path={tmp_path / 'd'}",
                "Http:Port=0")
    assert proc.returncode == 2
    assert "LicenseNotFound: The provided license path was not found. Please ensure a volume " \
        "is mounted and a directory exists at the location specified by Mounts:License" \
        in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines()
             if "development_trust_key" not in line]  # the development build's warning
    assert len(lines) == 1


def test_tampered_foreign_and_expired_licences_are_refused(
    tmp_path: Path, billing: BillingSimulator
) -> None:
    lic = download(tmp_path, billing)
    base = ["run", "Eula=accept", f"Mounts:License={tmp_path / 'license'}",
            f"Development:TrustedKeyFile={billing.public_key_path}",
            f"Data:Path={tmp_path / 'data'}",
            "Http:Port=0"]
    original = json.loads(lic.read_text())
    edited = {**original, "expiresAt": original["expiresAt"] + 10 * 365 * 86400_000}
    lic.write_text(json.dumps(edited))
    proc = edge(*base)
    assert proc.returncode == 2 and "LicenseInvalid" in proc.stderr
    assert "signature" in proc.stderr
    other_type = sign({k: v for k, v in original.items() if k not in ("signature", "keyId")}
                      | {"containerType": "speech-to-text"}, billing.signing_key)
    lic.write_text(json.dumps(other_type))
    proc = edge(*base)
    assert proc.returncode == 2 and "LicenseInvalid" in proc.stderr
    assert "container type" in proc.stderr
    billing.state.lease.license_days = 1 / 86400  # one second
    download(tmp_path, billing)
    time.sleep(1.2)
    proc = edge(*base)
    assert proc.returncode == 2 and "LicenseExpired" in proc.stderr


def test_licence_quota_gates_when_used_up(
    start_module: Callable[..., Module], collector: Collector, billing: BillingSimulator,
    tmp_path: Path,
) -> None:
    billing.state.keys["small-quota-key-0123"] = KeyInfo(quota=3)
    download(tmp_path, billing, key="small-quota-key-0123")
    module = disconnected(start_module, tmp_path, billing)
    for i in range(5):
        collector.publish("em/in/x", tensor(i))
        if i < 3:
            collector.wait(RESULTS, i + 1)
    errors = collector.wait(ERRORS, 2)
    assert {e["error"]["status"] for e in errors} == {"OutOfQuota"}
    assert len(collector.on(RESULTS)) == 3
    wait_until(lambda: module.http("/ready")[0] == 503, 5, "not ready once the quota is used")


@pytest.mark.parametrize("missing", ["Development:TrustedKeyFile"])
def test_disconnected_mode_needs_the_vendor_key(tmp_path: Path, billing: BillingSimulator,
                                                missing: str) -> None:
    download(tmp_path, billing)
    proc = edge("run", "Eula=accept", f"Mounts:License={tmp_path / 'license'}",
                f"Data:Path={tmp_path / 'data'}", "Http:Port=0")
    assert proc.returncode == 2 and missing in proc.stderr
