"""Licence checks that cannot be faked: hostile endpoints, receipts, key rotation, release mode.

Real parts: the billing simulator and a hostile look-alike over real HTTP, real
SQLite ledgers, the module as a process (and as a release build copied out of
the source tree).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import edge_module
from edge_module import logs
from edge_module.billing_api import Answer, ApiStatus, BillingClient
from edge_module.config import LicensingSettings, MeteringSettings
from edge_module.identity import Identity
from edge_module.licensing.clock import TrustedClock
from edge_module.licensing.lease import LeaseStore, parse_lease
from edge_module.licensing.service import GraceState, Licensing
from edge_module.metering.drain import Drainer
from edge_module.metering.ledger import Ledger
from edge_module.metering.receipts import check_receipt
from edge_module.metering.records import MeterSpec, Usage
from edge_module.metrics import Metrics
from edge_module.trust.keys import TrustedKey, TrustedKeys
from edge_module.trust.signing import raw_public, sign
from simulator.billing import BillingSimulator, KeyInfo
from simulator.hostile import MODES, HostileBilling
from tests.support import API_KEY, Module, simulator_keys

IDENTITY = Identity("edge-module", "0.1.0", "11111111-2222-3333-4444-555555555555")
HOSTILE_MODES = [m for m in MODES if m != "redirect"]


class FakeWall:
    def __init__(self) -> None:
        self.offset = 0.0

    def wall(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


@pytest.fixture
def hostile(billing: BillingSimulator) -> Iterator[HostileBilling]:
    h = HostileBilling(trusted_key=billing.signing_key).start()
    h.huge_bytes = 64 * 1024 * 1024
    yield h
    h.stop()


def licensing(tmp: Path, url: str, billing: BillingSimulator, fake: FakeWall) -> Licensing:
    clock = TrustedClock(tmp / "trusted-clock.json", (), wall=fake.wall,
                         monotonic=fake.monotonic)
    return Licensing(IDENTITY, LicensingSettings(), clock, LeaseStore(tmp / "lease.json"),
                     simulator_keys(billing.public_key_b64), BillingClient(url, API_KEY, 1.5))


@pytest.mark.parametrize("mode", HOSTILE_MODES)
def test_a_hostile_answer_is_never_valid_and_grants_no_grace(
    tmp_path: Path, billing: BillingSimulator, hostile: HostileBilling, mode: str
) -> None:
    hostile.mode = mode
    if mode == "replay":  # an earlier, genuinely signed answer to someone's earlier call
        BillingClient(hostile.url, API_KEY, 2).status(IDENTITY.as_dict(), "earlier-nonce")
    fake = FakeWall()
    # Without a prior lease: nothing is served.
    fresh = licensing(tmp_path / "fresh", hostile.url, billing, fake)
    (tmp_path / "fresh").mkdir()
    started = time.monotonic()
    fresh.check()
    assert time.monotonic() - started < 1.5 + 1.0  # the call's total deadline holds
    decision = fresh.decide()
    assert decision.status != ApiStatus.VALID and not decision.serve, decision
    assert decision.state is GraceState.GATED
    assert not (tmp_path / "fresh" / "lease.json").exists()
    # With a valid lease from the real endpoint: served only until that lease ends.
    billing.state.lease.grace_seconds = 60
    (tmp_path / "leased").mkdir()
    lic = licensing(tmp_path / "leased", billing.url, billing, fake)
    lic.check()
    assert lic.decide().state is GraceState.ONLINE
    held = json.loads((tmp_path / "leased" / "lease.json").read_text())
    lic.client = BillingClient(hostile.url, API_KEY, 1.5)
    lic.check()
    decision = lic.decide()
    assert decision.state is GraceState.GRACE and decision.serve, decision
    assert decision.status != ApiStatus.VALID
    assert json.loads((tmp_path / "leased" / "lease.json").read_text()) == held
    assert decision.expires_at_ms == held["expiresAt"]  # not extended by the hostile answer
    fake.offset = 61
    lic.check()
    assert lic.decide().state is GraceState.GATED and not lic.decide().serve


def test_a_redirect_is_never_followed(billing: BillingSimulator,
                                      hostile: HostileBilling) -> None:
    hostile.mode = "redirect"
    hostile.redirect_to = billing.url
    answer = BillingClient(hostile.url, API_KEY, 2).status(IDENTITY.as_dict(), "n")
    assert answer.http_status == 302 and answer.status is ApiStatus.UNKNOWN
    assert "never followed" in (answer.error or "")
    assert billing.calls("/billing/v1/status") == []  # the real endpoint saw nothing


def test_oversized_and_slow_bodies_are_cut_off(hostile: HostileBilling) -> None:
    client = BillingClient(hostile.url, API_KEY, 1.0)
    hostile.mode = "huge"
    answer = client.status(IDENTITY.as_dict(), "n")
    assert answer.status is ApiStatus.UNKNOWN and "longer than" in (answer.error or "")
    hostile.mode = "huge-length"
    answer = client.status(IDENTITY.as_dict(), "n")
    assert answer.status is ApiStatus.UNKNOWN and "more than" in (answer.error or "")
    hostile.mode = "slow"
    started = time.monotonic()
    answer = client.status(IDENTITY.as_dict(), "n")
    assert time.monotonic() - started < 1.6
    assert answer.status is not ApiStatus.VALID and answer.error == "timed out"


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def test_the_module_against_a_hostile_endpoint_serves_nothing_in_bounded_memory(
    start_module: Callable[..., Module], hostile: HostileBilling
) -> None:
    hostile.mode = "replay"  # a genuinely signed answer to an earlier call, to replay later
    BillingClient(hostile.url, API_KEY, 2).status(IDENTITY.as_dict(), "earlier-nonce")
    hostile.mode = "results"  # the endpoint of the original report
    module = start_module("Licensing:StatusTimeoutSeconds=1", "Licensing:RetrySeconds=0.5",
                          billing=hostile.url, wait_ready=False)
    module.wait_serving_or_gated()
    assert module.process is not None
    baseline = _peak_rss_kb(module.process.pid)
    for mode in HOSTILE_MODES:
        hostile.mode = mode
        time.sleep(1.1)  # past the 1 s reuse window of GET /status
        started = time.monotonic()
        code, body = module.http("/status")
        elapsed = time.monotonic() - started
        assert code == 200, (mode, body)
        status = json.loads(body)
        assert status["apiStatus"] != "Valid" and status["serving"] is False, (mode, status)
        assert status["grace"]["expiresAt"] is None
        assert elapsed < 1.0 + 1.0, (mode, elapsed)  # StatusTimeoutSeconds plus slack
        assert module.http("/ready")[0] == 503
    growth_mb = (_peak_rss_kb(module.process.pid) - baseline) / 1024
    assert growth_mb < 50, f"peak RSS grew by {growth_mb:.0f} MB"
    assert "valid_not_proven" in module.log_text()


def test_unsigned_acceptance_settles_nothing_and_the_real_endpoint_bills_each_once(
    tmp_path: Path, billing: BillingSimulator, hostile: HostileBilling
) -> None:
    settings = MeteringSettings(BatchSize=20)
    identity = Identity("edge-module", "0.1.0", "c-1")
    ledger = Ledger(tmp_path / "ledger.db", identity, settings)
    ids = ledger.append(MeterSpec("m", "t"), [Usage(1)] * 50)
    metrics = Metrics()
    keys = simulator_keys(billing.public_key_b64)
    seen: list[ApiStatus] = []  # what the licence would hear (Drainer.on_answer)
    drainer = Drainer(ledger, BillingClient(hostile.url, API_KEY, 2), settings, metrics,
                      keys=keys, on_answer=lambda answer: seen.append(answer.status))
    hostile.mode = "replay"  # a genuine receipt for an earlier upload of this installation
    BillingClient(hostile.url, API_KEY, 2).post_raw_usage(
        ['{"id":"earlier-record","containerId":"c-1"}'])
    for mode in ("empty", "results", "unsigned", "untrusted", "replay", "other"):
        hostile.mode = mode
        outcome = drainer.drain_batch()
        assert outcome.delivered == 0 and not outcome.ok, mode
        assert ledger.pending == 50, mode
    # None proves anything: the replayed receipt is genuine but names none of these
    # records, so it neither settles them nor tells the licence the endpoint is Valid.
    assert metrics.drain_unverified._value.get() == 6
    assert ApiStatus.VALID not in seen and len(seen) == 6
    drainer.client = BillingClient(billing.url, API_KEY, 5)
    drainer.drain_all(time.monotonic() + 30)
    assert ledger.pending == 0
    received = [r["id"] for r in billing.store.records()]
    assert sorted(received) == sorted(ids) and billing.totals()["duplicates"] == 0
    receipt = ledger.receipt_of(ids[0])
    assert receipt is not None and ids[0] in receipt["accepted"]
    assert keys.valid(receipt)  # an audit can prove delivery from the ledger alone


def test_an_unsigned_rejection_discards_nothing(
    tmp_path: Path, billing: BillingSimulator, hostile: HostileBilling
) -> None:
    settings = MeteringSettings(BatchSize=1)
    ledger = Ledger(tmp_path / "ledger.db", Identity("edge-module", "0.1.0", "c-1"), settings)
    ledger.append(MeterSpec("m", "t"), [Usage(1)])
    hostile.mode = "unsigned"
    drainer = Drainer(ledger, BillingClient(hostile.url, API_KEY, 2), settings,
                      keys=simulator_keys(billing.public_key_b64))
    # A look-alike that answers 400 "malformed" to everything would quarantine it all.
    answer = drainer.client.post_raw_usage(["{}"])
    assert answer.http_status == 200
    hostile.mode = "empty"
    outcome = drainer.drain_batch()
    assert outcome.quarantined == 0 and ledger.pending == 1


def test_key_rotation_windows(billing: BillingSimulator) -> None:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    now = int(time.time() * 1000)
    retired_at = now - 3600_000
    keys = TrustedKeys([TrustedKey.of(old.public_key(), None, retired_at),
                        TrustedKey.of(new.public_key(), now - 7200_000, None)])

    def lease(private: Ed25519PrivateKey, issued: int) -> dict[str, object]:
        return sign({"containerId": IDENTITY.container_id, "containerType": "edge-module",
                     "status": "Valid", "issuedAt": issued, "expiresAt": issued + 86400_000},
                    private)

    def receipt(private: Ed25519PrivateKey, issued: int) -> dict[str, object]:
        return {"receipt": sign({"containerId": "c-1", "issuedAt": issued, "accepted": ["r"],
                                 "duplicate": [], "rejected": []}, private)}

    # Both keys verify while their windows overlap.
    for key in (old, new):
        assert parse_lease(lease(key, retired_at - 60_000), keys, IDENTITY)[0] is not None
        assert check_receipt(receipt(key, retired_at - 60_000), keys, "c-1",
                             retired_at - 60_000)[0] is not None
    # After its window the retired key proves nothing, whatever it claims.
    assert parse_lease(lease(new, now), keys, IDENTITY, now)[0] is not None
    lease_obj, problem = parse_lease(lease(old, now), keys, IDENTITY, now)
    assert lease_obj is None and "not valid" in str(problem)
    assert check_receipt(receipt(old, now), keys, "c-1", now)[0] is None
    backdated = receipt(old, retired_at - 60_000)
    assert check_receipt(backdated, keys, "c-1", now)[0] is None  # fresh answers: valid now
    assert check_receipt(receipt(new, now), keys, "c-1", now)[0] is not None
    # A key nobody built in, and an unsigned copy.
    stranger = Ed25519PrivateKey.generate()
    assert "does not trust" in str(parse_lease(lease(stranger, now), keys, IDENTITY)[1])
    unsigned = {k: v for k, v in lease(new, now).items() if k != "signature"}
    assert "not signed" in str(parse_lease(unsigned, keys, IDENTITY)[1])


# -- release builds --------------------------------------------------------

def release_copy(root: Path, keys: list[Path]) -> Path:
    """The package copied out of the source tree and made a release build, as the image
    build does (python -m edge_module.trust.release)."""
    package = Path(edge_module.__file__).parent
    shutil.copytree(package, root / "edge_module",
                    ignore=shutil.ignore_patterns("__pycache__"))
    made = subprocess.run([sys.executable, "-m", "edge_module.trust.release", *map(str, keys)],
                          cwd=root, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    info = json.loads((root / "edge_module" / "trust" / "build.json").read_text())
    assert info["build"] == "release" and info["keys"]
    # The source tree is untouched: a checkout stays a development build.
    assert json.loads((package / "trust" / "build.json").read_text())["build"] == "development"
    return root


@pytest.fixture
def vendor(tmp_path: Path) -> tuple[Ed25519PrivateKey, Path]:
    private = Ed25519PrivateKey.generate()
    path = tmp_path / "vendor-public.b64"
    path.write_text(base64.b64encode(raw_public(private.public_key())).decode())
    return private, path


@pytest.mark.parametrize(("args", "env", "setting"), [
    (["Billing:PublicKey={key}"], {}, "Billing:PublicKey"),
    (["Development:TrustedKeyFile={keyfile}"], {}, "Development:TrustedKeyFile"),
    ([], {"Development__TrustedKeyFile": "{keyfile}"}, "Development:TrustedKeyFile"),
    ([], {"Billing__PublicKey": "{key}"}, "Billing:PublicKey"),
])
def test_a_release_build_refuses_key_overrides_and_development_switches(
    tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path], args: list[str],
    env: dict[str, str], setting: str,
) -> None:
    root = release_copy(tmp_path / "image", [vendor[1]])
    attacker = Ed25519PrivateKey.generate()
    key = base64.b64encode(raw_public(attacker.public_key())).decode()
    keyfile = tmp_path / "attacker.b64"
    keyfile.write_text(key)
    fill = {"key": key, "keyfile": str(keyfile)}
    proc = subprocess.run(
        [sys.executable, "-m", "edge_module", "run", "Eula=accept", "Billing=http://127.0.0.1:9",
         f"ApiKey={API_KEY}", f"Data:Path={tmp_path / 'data'}", "Http:Port=0",
         *[a.format(**fill) for a in args]],
        cwd=root, capture_output=True, text=True, timeout=60,
        env={**{k: v for k, v in __import__("os").environ.items()},
             **{k: v.format(**fill) for k, v in env.items()}})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert setting in lines[0] and "release build" in lines[0] and "fix:" in lines[0]
    assert not (tmp_path / "data").exists()  # refused before anything was written


def test_a_release_build_trusts_its_built_in_key_and_rotates(
    tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path], broker: object,
) -> None:
    private, _ = vendor
    # The vendor rotates: the old key is retired an hour ago, the new one is live.
    new = Ed25519PrivateKey.generate()
    now = int(time.time() * 1000)
    keyset = tmp_path / "vendor-keys.json"
    keyset.write_text(json.dumps({"keys": [
        {"publicKey": base64.b64encode(raw_public(private.public_key())).decode(),
         "notAfter": now - 3600_000},
        {"publicKey": base64.b64encode(raw_public(new.public_key())).decode(),
         "notBefore": now - 86400_000}]}))
    root = release_copy(tmp_path / "image", [keyset])
    for signer, serves in ((private, False), (new, True)):
        sim = BillingSimulator(tmp_path / f"b-{serves}" / "billing.db",
                               keys={API_KEY: KeyInfo()}, signing_key=signer).start()
        try:
            module = Module(tmp_path / f"m-{serves}", broker.port,  # type: ignore[attr-defined]
                            billing=sim.url)
            module.workdir = module.cwd = root  # the release copy (cwd first on sys.path)
            module.start(wait_ready=False)
            try:
                module.wait_serving_or_gated()
                status = module.status()
                assert status["serving"] is serves, status
                assert (status["apiStatus"] == "Valid") is serves, status
                assert "development_trust_key" not in module.log_text()
            finally:
                module.stop()
        finally:
            sim.stop()


def test_messages_agree_with_the_state_and_a_broken_lease_file_is_logged(
    tmp_path: Path, billing: BillingSimulator
) -> None:
    fake = FakeWall()
    (tmp_path / "lease.json").write_text("{not json")
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    try:
        lic = licensing(tmp_path, "http://127.0.0.1:9", billing, fake)  # nothing listens
    finally:
        logs.configure("debug", "console", stream=sys.stdout)
    assert "stored_lease_unreadable" in out.getvalue()
    lic.check()
    gated = lic.decide()
    assert gated.state is GraceState.GATED and gated.status == "CouldNotConnect"
    assert "serves within" not in gated.remedy and "refuses work" in gated.remedy
    lic.client = BillingClient(billing.url, API_KEY, 2)
    lic.check()
    lic.client = BillingClient("http://127.0.0.1:9", API_KEY, 2)
    lic.check()
    grace = lic.decide()
    assert grace.state is GraceState.GRACE and "serves within its offline grace" in grace.remedy


def test_the_image_build_refuses_a_private_key_as_vendor_key(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    private = tmp_path / "vendor.pem"
    private.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    script = Path(edge_module.__file__).parent.parent / "deployment" / "build-image.sh"
    done = subprocess.run([str(script), "--vendor-keys", str(private)], capture_output=True,
                          text=True, timeout=30, env={"PATH": "/usr/bin:/bin",
                                                      "BUILDER": "none"})
    assert done.returncode == 2 and "private key" in done.stderr and "fix:" in done.stderr
    copied = script.parent / "vendor-keys" / "current"
    assert not copied.exists() or "PRIVATE KEY" not in copied.read_text()


def test_only_a_nonce_bound_answer_brings_a_lease_or_sets_the_time(
    tmp_path: Path, billing: BillingSimulator
) -> None:
    """A relay that replays a genuine old lease inside an upload answer or a 503 must not
    replace the held lease, extend the grace or move trusted time back."""
    fake = FakeWall()
    billing.state.lease.grace_seconds = 60
    old_answer = BillingClient(billing.url, API_KEY, 5).status(IDENTITY.as_dict(), "early")
    old_lease = old_answer.body["lease"]
    time.sleep(0.05)
    lic = licensing(tmp_path, billing.url, billing, fake)
    lic.check()
    held = lic.lease
    assert held is not None and held.issued_at > old_lease["issuedAt"]
    before = lic.clock.now_ms()
    for status in (ApiStatus.BUSY, ApiStatus.UNKNOWN):
        lic.observe(Answer(status, 503, {"lease": old_lease}))  # no nonce: not a proof
    assert lic.lease == held
    assert lic.clock.now_ms() >= before  # never moved back to the old lease's time
    assert json.loads((tmp_path / "lease.json").read_text())["issuedAt"] == held.issued_at


def test_a_stored_lease_signed_by_a_retired_key_gives_no_grace(tmp_path: Path) -> None:
    old = Ed25519PrivateKey.generate()
    now = int(time.time() * 1000)
    keys = TrustedKeys([TrustedKey.of(old.public_key(), None, now - 3600_000)])
    forged = sign({"containerId": IDENTITY.container_id, "containerType": "edge-module",
                   "status": "Valid", "issuedAt": now - 7200_000,
                   "expiresAt": now + 10 * 365 * 86400_000}, old)  # backdated into the window
    (tmp_path / "lease.json").write_text(json.dumps(forged))
    assert LeaseStore(tmp_path / "lease.json").load(keys, IDENTITY, now) is None
    assert LeaseStore(tmp_path / "lease.json").load(keys, IDENTITY) is not None  # window only


def test_a_valid_answer_that_is_not_renewed_stops_counting(
    tmp_path: Path, billing: BillingSimulator
) -> None:
    """If every later check hangs or is lost, the last Valid must not hold for ever: after
    two check intervals and a call's deadline only the lease's grace counts."""
    fake = FakeWall()
    billing.state.lease.grace_seconds = 60
    clock = TrustedClock(tmp_path / "trusted-clock.json", (), wall=fake.wall,
                         monotonic=fake.monotonic)
    settings = LicensingSettings(CheckIntervalSeconds=0.2, StatusTimeoutSeconds=0.2)
    lic = Licensing(IDENTITY, settings, clock, LeaseStore(tmp_path / "lease.json"),
                    simulator_keys(billing.public_key_b64), BillingClient(billing.url,
                                                                          API_KEY, 2))
    lic.check()
    assert lic.decide().state is GraceState.ONLINE
    time.sleep(1.8)  # 2 x 0.2 + 0.2 + 1 s: no check has renewed it
    decision = lic.decide()
    assert decision.state is GraceState.GRACE and decision.status == ApiStatus.UNKNOWN
    assert decision.serve  # the lease's grace still holds
    lic.check()
    assert lic.decide().state is GraceState.ONLINE
