"""`edge-module diagnose` against endpoints that are up, down, busy, wrong-keyed, bad TLS."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from simulator.billing import BillingSimulator, KeyInfo
from simulator.broker import free_port
from simulator.certs import make_server_cert
from tests.support import API_KEY


def diagnose(*settings: str) -> tuple[int, dict[str, dict[str, Any]], str]:
    proc = subprocess.run([sys.executable, "-m", "edge_module", "diagnose", "--json",
                           "--timeout", "3", *settings],
                          capture_output=True, text=True, timeout=60)
    report = json.loads(proc.stdout)
    return proc.returncode, {c["name"]: c for c in report["checks"]}, proc.stdout + proc.stderr


def test_healthy_endpoint_passes_every_check(billing: BillingSimulator) -> None:
    code, checks, text = diagnose(f"Billing={billing.url}", f"ApiKey={API_KEY}",
                                  f"Development:TrustedKeyFile={billing.public_key_path}")
    assert code == 0
    for name in ("dns", "tcp", "http", "key", "lease", "clock", "retry-after", "proxy"):
        assert checks[name]["result"] == "PASS", checks[name]
    assert checks["tls"]["result"] == "WARN"  # plain HTTP
    assert API_KEY not in text


def test_endpoint_down_fails_tcp_with_a_fix() -> None:
    code, checks, _ = diagnose(f"Billing=http://127.0.0.1:{free_port()}",
                               "ApiKey=k-test-key-0123456")
    assert code == 1
    assert checks["tcp"]["result"] == "FAIL" and "refused" in checks["tcp"]["detail"]
    assert checks["tcp"]["fix"]
    assert checks["key"]["result"] == "SKIP"


def test_busy_endpoint_reports_retry_after(billing: BillingSimulator) -> None:
    billing.set_fault("busy", retry_after=42)
    code, checks, _ = diagnose(f"Billing={billing.url}", f"ApiKey={API_KEY}")
    assert code == 1
    assert checks["key"]["detail"].startswith("BillingEndpointBusy")
    assert checks["retry-after"]["result"] == "FAIL"
    assert "42 s" in checks["retry-after"]["detail"]


def test_wrong_key_fails_the_key_check_with_the_remedy(billing: BillingSimulator) -> None:
    code, checks, text = diagnose(f"Billing={billing.url}", "ApiKey=not-the-key-0123456789")
    assert code == 1
    assert checks["key"]["result"] == "FAIL" and checks["key"]["detail"].startswith("Invalid")
    assert "ApiKey=<key>" in checks["key"]["fix"]
    assert "not-the-key" not in text


def test_clock_skew_against_the_server_date(billing: BillingSimulator) -> None:
    billing.state.lease.clock_offset_seconds = -900
    _, checks, _ = diagnose(f"Billing={billing.url}", f"ApiKey={API_KEY}")
    assert checks["clock"]["result"] == "FAIL"
    assert "ahead of" in checks["clock"]["detail"] and "NTP" in checks["clock"]["fix"]


@pytest.fixture
def tls_billing(tmp_path: Path) -> Iterator[tuple[BillingSimulator, Path]]:
    certs = make_server_cert(tmp_path / "tls", ["127.0.0.1"])
    sim = BillingSimulator(tmp_path / "tls-billing.db", keys={API_KEY: KeyInfo()},
                           tls=(certs.cert, certs.key)).start()
    yield sim, certs.ca
    sim.stop()


def test_untrusted_tls_fails_and_a_ca_file_fixes_it(
    tls_billing: tuple[BillingSimulator, Path]
) -> None:
    sim, ca = tls_billing
    code, checks, _ = diagnose(f"Billing={sim.url}", f"ApiKey={API_KEY}")
    assert code == 1
    assert checks["tls"]["result"] == "FAIL" and "not trusted" in checks["tls"]["detail"]
    assert "Billing:CaFile" in checks["tls"]["fix"]
    code, checks, _ = diagnose(f"Billing={sim.url}", f"ApiKey={API_KEY}",
                               f"Billing:CaFile={ca}")
    assert code == 0, checks
    assert checks["tls"]["result"] == "PASS" and "expires in" in checks["tls"]["detail"]
    assert checks["key"]["result"] == "PASS"


def test_expired_certificate_is_named(tmp_path: Path) -> None:
    certs = make_server_cert(tmp_path / "old", ["127.0.0.1"], expired=True)
    sim = BillingSimulator(tmp_path / "old.db", keys={API_KEY: KeyInfo()},
                           tls=(certs.cert, certs.key)).start()
    try:
        code, checks, _ = diagnose(f"Billing={sim.url}", f"ApiKey={API_KEY}",
                                   f"Billing:CaFile={certs.ca}")
    finally:
        sim.stop()
    assert code == 1 and "expired" in checks["tls"]["detail"]
