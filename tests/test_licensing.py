"""Licensing: statuses, the gate, grace, clock tampering, leases, /status."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_module.billing_api import ApiStatus, BillingClient
from edge_module.config import LicensingSettings
from edge_module.exceptions import Refusal
from edge_module.identity import Identity
from edge_module.licensing.clock import TrustedClock
from edge_module.licensing.lease import LeaseStore
from edge_module.licensing.service import GraceState, Licensing
from simulator.billing import BillingSimulator, KeyInfo
from simulator.faultproxy import FaultProxy
from tests.support import API_KEY, Collector, Module, simulator_keys, wait_until

RESULTS, ERRORS = "em/results", "em/errors"
TENSOR = json.dumps({"id": "t1", "tensor": [[[0.0] * 8] * 8]}).encode()


class FakeClock:
    """Wall and monotonic clocks that tests move by hand."""

    def __init__(self, wall: float = 1_800_000_000.0) -> None:
        self.wall_s = wall
        self.mono_s = 1000.0

    def wall(self) -> float:
        return self.wall_s

    def monotonic(self) -> float:
        return self.mono_s

    def advance(self, seconds: float) -> None:
        self.wall_s += seconds
        self.mono_s += seconds


def make_licensing(tmp: Path, billing: BillingSimulator, url: str, fake: FakeClock,
                   identity: Identity, key: str = API_KEY) -> Licensing:
    clock = TrustedClock(tmp / "trusted-clock.json", (), wall=fake.wall,
                         monotonic=fake.monotonic)
    return Licensing(identity, LicensingSettings(), clock, LeaseStore(tmp / "lease.json"),
                     simulator_keys(billing.public_key_b64), BillingClient(url, key, 3))


@pytest.fixture
def identity() -> Identity:
    return Identity("edge-module", "0.1.0", "11111111-2222-3333-4444-555555555555")


@pytest.mark.parametrize(
    ("key", "setup", "status"),
    [
        ("unknown-key-0123456789", None, "Invalid"),
        ("other-type-key-0123456", {"type": "speech"}, "Mismatch"),
        ("revoked-key-0123456789", {"revoked": True}, "ContainerUseUnauthorized"),
        ("spent-key-0123456789", {"quota": 0}, "OutOfQuota"),
    ],
)
def test_refusing_statuses_gate_the_module_with_an_unlicensed_envelope(
    start_module: Callable[..., Module], collector: Collector, billing: BillingSimulator,
    key: str, setup: dict[str, object] | None, status: str,
) -> None:
    if setup is not None:
        billing.state.keys[key] = KeyInfo(str(setup.get("type", "edge-module")),
                                          quota=setup.get("quota"),  # type: ignore[arg-type]
                                          revoked=bool(setup.get("revoked")))
    module = start_module(api_key=key, wait_ready=False)
    module.wait_serving_or_gated()
    assert module.http("/ready")[0] == 503
    assert module.http("/ContainerReadiness")[0] == 503
    body = module.status()
    assert body["apiStatus"] == status and body["grace"]["state"] == "gated"
    assert body["apiStatusMessage"] and body["remedy"] and body["mode"] == "connected"
    collector.publish("em/in/x", TENSOR)
    (error,) = collector.wait(ERRORS, 1)
    assert error["id"] == "t1"
    assert error["error"]["code"] == "Unlicensed" and error["error"]["status"] == status
    if status == "OutOfQuota":
        assert "retryAfter" in error["error"] or "quota" in error["error"]["message"]
    assert collector.on(RESULTS) == []
    assert module.metric("edge_module_ledger_pending_records") == 0  # nothing metered
    assert module.metric("edge_module_errors_total", 'code="Unlicensed"') == 1
    assert module.metric("edge_module_licence_state", 'state="gated"') == 1
    assert '"licence_gated"' in module.log_text()
    assert key not in module.log_text() or key == "unknown-key-0123456789"


def test_module_that_never_reached_its_endpoint_has_no_grace(
    start_module: Callable[..., Module], collector: Collector, proxy: FaultProxy
) -> None:
    proxy.cut()
    module = start_module(billing=proxy.url, wait_ready=False)
    module.wait_serving_or_gated()
    body = module.status()
    assert body["apiStatus"] == "CouldNotConnect" and body["grace"]["state"] == "gated"
    assert "no lease" in body["apiStatusMessage"]
    collector.publish("em/in/x", TENSOR)
    assert collector.wait(ERRORS, 1)[0]["error"]["code"] == "Unlicensed"


def test_grace_then_gated_then_back_online_without_restart(
    start_module: Callable[..., Module], collector: Collector, billing: BillingSimulator,
    proxy: FaultProxy,
) -> None:
    billing.state.lease.grace_seconds = 4
    module = start_module("Licensing:RetrySeconds=0.3", "Licensing:StatusTimeoutSeconds=1",
                          "Metering:MaxDelaySeconds=0.2", "Metering:MaxBackoffSeconds=0.5",
                          billing=proxy.url)
    assert module.status()["grace"]["state"] == "online"
    proxy.cut()
    wait_until(lambda: module.status()["grace"]["state"] == "grace", 10, "grace")
    body = module.status()
    assert body["apiStatus"] == "CouldNotConnect"
    assert 0 < body["grace"]["remainingSeconds"] <= 4 and body["grace"]["expiresAt"]
    collector.publish("em/in/x", TENSOR)  # served within the grace
    assert collector.wait(RESULTS, 1)[0]["id"] == "t1"
    wait_until(lambda: module.status()["grace"]["state"] == "gated", 15, "grace expired")
    assert module.http("/ready")[0] == 503
    collector.publish("em/in/x", TENSOR.replace(b"t1", b"t2"))
    assert collector.wait(ERRORS, 1)[0]["error"]["status"] == "CouldNotConnect"
    proxy.restore()
    wait_until(lambda: module.http("/ready")[0] == 200, 15, "online again, no restart")
    collector.publish("em/in/x", TENSOR.replace(b"t1", b"t3"))
    assert [r["id"] for r in collector.wait(RESULTS, 2)] == ["t1", "t3"]
    wait_until(lambda: billing.totals()["records"] == 2, 15, "backlog drained")
    assert '"licence_state"' in module.log_text()


def test_status_answers_alone_do_not_keep_a_module_serving_whose_usage_is_refused(
    start_module: Callable[..., Module], collector: Collector, billing: BillingSimulator,
) -> None:
    """A relay that lets status checks through but blocks uploads: the module stays
    Valid only for one lease grace after the last accepted upload, then gates until
    usage is accepted again; nothing answered is lost from the bill."""
    billing.state.lease.grace_seconds = 3
    module = start_module("Licensing:CheckIntervalSeconds=0.5",
                          "Licensing:RetrySeconds=0.3", "Metering:MaxDelaySeconds=0.2",
                          "Metering:MaxBackoffSeconds=0.5")
    assert module.status()["grace"]["state"] == "online"
    billing.set_fault("usage-refuse")
    collector.publish("em/in/x", TENSOR)
    assert collector.wait(RESULTS, 1)[0]["id"] == "t1"
    wait_until(lambda: any(o == "refuse" for _, o in billing.calls()), 10, "upload refused")
    body = module.status()
    # A refused upload reads as CouldNotConnect (grace) until the next Valid status
    # check: either way the allowance runs from the last accepted upload, not the lease.
    assert body["grace"]["state"] in ("online", "grace") and body["backlog"]["pending"] == 1
    assert 0 < body["grace"]["remainingSeconds"] <= 3
    wait_until(lambda: module.status()["grace"]["state"] == "gated", 15,
               "gated although status checks stay Valid")
    body = module.status()
    assert "still waiting for upload" in body["apiStatusMessage"]
    assert any(o == "200" for _, o in billing.calls("/billing/v1/status")[-3:])
    collector.publish("em/in/x", TENSOR.replace(b"t1", b"t2"))
    assert collector.wait(ERRORS, 1)[0]["error"]["code"] == "Unlicensed"
    billing.set_fault("none")
    wait_until(lambda: module.status()["grace"]["state"] == "online", 15,
               "online once usage is accepted")
    wait_until(lambda: billing.totals()["records"] == 1, 10, "the one answer billed")


def test_unbilled_usage_may_be_one_lease_length_old_whatever_status_checks_say(
    tmp_path: Path, billing: BillingSimulator, identity: Identity,
) -> None:
    """The limit follows the oldest record waiting for upload, so uploads trickled through
    one at a time (newer records accepted, or a few old ones) never reset it."""
    billing.state.lease.grace_seconds = 600
    lic = make_licensing(tmp_path, billing, billing.url, FakeClock(wall=time.time()), identity)
    woken: list[int] = []
    lic.on_online.append(lambda: woken.append(1))
    oldest: list[int | None] = [None]
    lic.watch_usage(lambda: oldest[0])
    lic.check()
    assert lic.decide().state is GraceState.ONLINE and lic.lease_seconds() == 600
    # A record recorded 599 s ago still waits; the status check brings a fresh lease:
    # the record's age, not the lease, sets what is left.
    oldest[0] = lic.clock.now_ms() - 599_000
    lic.check()
    decision = lic.decide()
    assert decision.state is GraceState.ONLINE
    assert decision.remaining_seconds == pytest.approx(1, abs=1)
    oldest[0] = lic.clock.now_ms() - 601_000
    lic.check()  # Valid, yet the record is older than one lease: gated, uploader woken
    decision = lic.decide()
    assert decision.state is GraceState.GATED and not decision.serve
    assert "still waiting for upload" in decision.message and woken
    with pytest.raises(Refusal):
        lic.gate_check()
    oldest[0] = lic.clock.now_ms() - 1000  # the old record was billed; a newer one waits
    assert lic.decide().state is GraceState.ONLINE


def test_grace_expires_in_trusted_time_and_rollback_does_not_extend_it(
    tmp_path: Path, billing: BillingSimulator, proxy: FaultProxy, identity: Identity
) -> None:
    billing.state.lease.grace_seconds = 600
    fake = FakeClock(wall=time.time())
    lic = make_licensing(tmp_path, billing, proxy.url, fake, identity)
    lic.check()
    assert lic.decide().state is GraceState.ONLINE
    proxy.cut()
    lic.check()
    assert lic.decide().state is GraceState.GRACE
    fake.advance(300)
    fake.wall_s -= 10 * 24 * 3600  # the wall clock is set back ten days
    decision = lic.decide()
    assert decision.state is GraceState.GRACE
    assert decision.remaining_seconds == pytest.approx(300, abs=2)
    fake.mono_s += 301
    assert lic.decide().state is GraceState.GATED
    with pytest.raises(Refusal) as refused:
        lic.gate_check()
    assert refused.value.code == "Unlicensed"
    assert refused.value.details["status"] == "CouldNotConnect"
    lic.stop()


def test_restart_with_an_earlier_clock_does_not_extend_the_grace(
    tmp_path: Path, billing: BillingSimulator, proxy: FaultProxy, identity: Identity
) -> None:
    billing.state.lease.grace_seconds = 600
    fake = FakeClock(wall=time.time())
    first = make_licensing(tmp_path, billing, proxy.url, fake, identity)
    first.check()
    proxy.cut()
    fake.advance(550)
    first.check()
    assert first.decide().remaining_seconds == pytest.approx(50, abs=2)
    first.stop()  # persists the high-water mark
    # Restart with the wall clock set back by 500 s (and a fresh monotonic clock).
    later = FakeClock(wall=fake.wall_s - 500)
    second = make_licensing(tmp_path, billing, proxy.url, later, identity)
    assert second.clock.rollback_detected_ms >= 499_000
    second.check()
    decision = second.decide()
    assert decision.state is GraceState.GRACE
    assert decision.remaining_seconds == pytest.approx(50, abs=2)
    later.advance(51)
    assert second.decide().state is GraceState.GATED
    # Deleting the high-water mark does not help either: the lease's issue time is a floor.
    (tmp_path / "trusted-clock.json").unlink()
    third = make_licensing(tmp_path, billing, proxy.url,
                           FakeClock(wall=fake.wall_s - 10 * 24 * 3600), identity)
    third.check()
    assert third.decide().remaining_seconds is not None
    assert third.decide().remaining_seconds <= 600  # never more than the lease granted


def test_server_time_from_the_lease_is_adopted(
    tmp_path: Path, billing: BillingSimulator, identity: Identity
) -> None:
    billing.state.lease.clock_offset_seconds = 3600  # the server is an hour ahead of us
    fake = FakeClock(wall=time.time())
    lic = make_licensing(tmp_path, billing, billing.url, fake, identity)
    lic.check()
    assert lic.clock.now_ms() / 1000 - fake.wall_s == pytest.approx(3600, abs=5)


def test_tampered_or_foreign_leases_grant_no_grace(
    tmp_path: Path, billing: BillingSimulator, proxy: FaultProxy, identity: Identity
) -> None:
    billing.state.lease.tamper = True
    fake = FakeClock(wall=time.time())
    lic = make_licensing(tmp_path, billing, proxy.url, fake, identity)
    lic.check()
    # A Valid whose signed statement does not verify proves nothing: Unknown, no grace.
    assert lic.decide().state is GraceState.GATED and lic.decide().status == "Unknown"
    proxy.cut()
    lic.check()
    assert lic.decide().state is GraceState.GATED  # the forged lease grants nothing
    assert not (tmp_path / "lease.json").exists()
    # A good lease, then edited on disk to last a year: refused when loaded.
    billing.state.lease.tamper = False
    proxy.restore()
    lic.check()
    stored = json.loads((tmp_path / "lease.json").read_text())
    stored["expiresAt"] += 365 * 24 * 3600 * 1000
    (tmp_path / "lease.json").write_text(json.dumps(stored))
    assert LeaseStore(tmp_path / "lease.json").load(lic.keys, identity) is None
    # A lease issued to another installation does not count here.
    other = Identity("edge-module", "0.1.0", "99999999-2222-3333-4444-555555555555")
    assert LeaseStore(tmp_path / "lease.json").load(lic.keys, other) is None


def test_status_endpoint_reports_key_grace_and_backlog(
    start_module: Callable[..., Module], collector: Collector
) -> None:
    module = start_module()
    body = module.status()
    assert body["apiStatus"] == "Valid" and body["mode"] == "connected"
    assert body["grace"]["state"] == "online" and body["grace"]["remainingSeconds"] > 0
    assert set(body["backlog"]) >= {"pending", "oldestPendingAgeSeconds", "acknowledged",
                                    "quarantined", "lastSuccessfulDrain"}
    assert API_KEY not in json.dumps(body)
    assert module.metric("edge_module_licence_api_status", 'status="Valid"') == 1


def test_every_status_has_a_message_and_a_remedy() -> None:
    from edge_module.licensing.statuses import EXPLANATIONS, LicenseFileStatus

    for status in [*(s.value for s in ApiStatus), *(s.value for s in LicenseFileStatus)]:
        assert EXPLANATIONS[status].message and EXPLANATIONS[status].remedy
    assert EXPLANATIONS["LicenseNotFound"].message.startswith(
        "The provided license path was not found. Please ensure a volume is mounted")


@pytest.mark.parametrize(("fault", "status"), [("busy", "BillingEndpointBusy"),
                                               ("error500", "Unknown"),
                                               ("refuse", "CouldNotConnect")])
def test_transient_statuses_serve_within_the_grace(
    start_module: Callable[..., Module], collector: Collector, billing: BillingSimulator,
    fault: str, status: str,
) -> None:
    module = start_module()
    billing.set_fault(fault, retry_after=1)
    wait_until(lambda: module.status()["apiStatus"] == status, 10, status)
    body = module.status()
    assert body["grace"]["state"] == "grace"
    assert body["serving"] is True and module.http("/ready")[0] == 200
    collector.publish("em/in/x", TENSOR)
    assert collector.wait(RESULTS, 1)[0]["id"] == "t1"
    billing.set_fault("none")
    wait_until(lambda: module.status()["grace"]["state"] == "online", 10, "online again")


def test_status_probes_do_not_flood_the_billing_endpoint(
    start_module: Callable[..., Module], billing: BillingSimulator
) -> None:
    module = start_module()
    before = len(billing.calls("/billing/v1/status"))
    started = time.monotonic()
    for _ in range(30):
        assert module.status()["apiStatus"] == "Valid"
    elapsed = time.monotonic() - started
    calls = len(billing.calls("/billing/v1/status")) - before
    assert calls <= elapsed + 2, f"{calls} status calls for 30 probes in {elapsed:.1f} s"
