"""The billing client through a real proxy (tinyproxy from the system's packages), over TLS.

The simulator serves HTTPS on 127.0.0.2 (a loopback address that, unlike
127.0.0.1 and localhost, follows HTTPS_PROXY/NO_PROXY like any host); the
proxy listens on 127.0.0.1. `make test` installs tinyproxy (Makefile
`proxy-tools`); when it is missing these tests fail and say so.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge_module.billing_api import ApiStatus, BillingClient
from edge_module.config import MeteringSettings
from edge_module.identity import Identity
from edge_module.metering.drain import Drainer
from edge_module.metering.ledger import Ledger
from edge_module.metering.records import MeterSpec, Usage
from simulator.billing import BillingSimulator, KeyInfo
from simulator.broker import free_port
from simulator.certs import ServerCert, make_server_cert
from tests.support import API_KEY, Module, simulator_keys

IDENTITY = {"containerType": "edge-module", "containerVersion": "0.1.0",
            "containerId": "11111111-2222-3333-4444-555555555555"}
PASSWORD = "pr0xy-s3cret"


class Tinyproxy:
    """tinyproxy in the foreground on a free loopback port, with its own config and log."""

    def __init__(self, workdir: Path, auth: tuple[str, str] | None = None,
                 connect_ports: list[int] | None = None) -> None:
        binary = shutil.which("tinyproxy") or "/usr/sbin/tinyproxy"
        if not Path(binary).exists():
            raise AssertionError("tinyproxy is missing; fix: run `make proxy-tools` "
                                 "(apt-get install tinyproxy)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = workdir / "tinyproxy.log"
        lines = [f"Port {self.port}", "Listen 127.0.0.1", "Timeout 30", "LogLevel Connect",
                 "MaxClients 20", "Allow 127.0.0.1", f"LogFile \"{self.log_path}\""]
        if auth is not None:
            lines.append(f"BasicAuth {auth[0]} {auth[1]}")
        for port in connect_ports or []:
            lines.append(f"ConnectPort {port}")
        config = workdir / "tinyproxy.conf"
        config.write_text("\n".join(lines) + "\n")
        self.process = subprocess.Popen([binary, "-d", "-c", str(config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"tinyproxy did not start: {self.log()}") from None
                time.sleep(0.05)

    def url(self, credentials: str = "") -> str:
        return f"http://{credentials}127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture
def tls_billing(tmp_path: Path) -> Iterator[tuple[BillingSimulator, ServerCert]]:
    cert = make_server_cert(tmp_path / "certs", ["127.0.0.2"])
    sim = BillingSimulator(tmp_path / "billing.db", host="127.0.0.2",
                           keys={API_KEY: KeyInfo()}, tls=(cert.cert, cert.key)).start()
    yield sim, cert
    sim.stop()


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[Callable[..., Tinyproxy]]:
    started: list[Tinyproxy] = []

    def start(**kwargs: object) -> Tinyproxy:
        proxy = Tinyproxy(tmp_path / f"proxy-{len(started)}", **kwargs)  # type: ignore[arg-type]
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def client(sim: BillingSimulator, cert: ServerCert) -> BillingClient:
    return BillingClient(sim.url, API_KEY, timeout=5, ca_file=str(cert.ca))


def test_status_and_usage_go_through_the_proxy_over_tls(
    tmp_path: Path, tls_billing: tuple[BillingSimulator, ServerCert],
    tinyproxy: Callable[..., Tinyproxy], monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim, cert = tls_billing
    proxy = tinyproxy()
    monkeypatch.setenv("HTTPS_PROXY", proxy.url())
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    c = client(sim, cert)
    assert c.proxy == proxy.url()
    answer = c.status(IDENTITY, "n-1")
    assert answer.status is ApiStatus.VALID and answer.body["lease"]["nonce"] == "n-1"
    assert f"CONNECT 127.0.0.2:{sim.port}" in proxy.log()  # a tunnel: TLS end to end
    settings = MeteringSettings(BatchSize=10)
    ledger = Ledger(tmp_path / "ledger.db", Identity("edge-module", "0.1.0", "c-1"), settings)
    ids = ledger.append(MeterSpec("m", "t"), [Usage(1)] * 25)
    Drainer(ledger, c, settings, keys=simulator_keys(sim.public_key_b64)).drain_all(
        time.monotonic() + 30)
    assert ledger.pending == 0 and sorted(r["id"] for r in sim.store.records()) == sorted(ids)


def test_a_proxy_that_requires_authentication(
    tls_billing: tuple[BillingSimulator, ServerCert], tinyproxy: Callable[..., Tinyproxy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim, cert = tls_billing
    proxy = tinyproxy(auth=("edge", PASSWORD))
    monkeypatch.setenv("HTTPS_PROXY", proxy.url(f"edge:{PASSWORD}@"))
    c = client(sim, cert)
    assert PASSWORD not in str(c.proxy)
    assert c.status(IDENTITY, "n").status is ApiStatus.VALID
    monkeypatch.setenv("HTTPS_PROXY", proxy.url("edge:wrong@"))
    refused = client(sim, cert).status(IDENTITY, "n")
    # tinyproxy answers 401 to wrong credentials and 407 to none
    assert refused.status is ApiStatus.COULD_NOT_CONNECT
    assert re.search(r"proxy .*40[17]", str(refused.error)), refused.error
    monkeypatch.setenv("HTTPS_PROXY", proxy.url())
    anonymous = client(sim, cert).status(IDENTITY, "n")
    assert anonymous.status is ApiStatus.COULD_NOT_CONNECT
    assert re.search(r"proxy .*40[17]", str(anonymous.error)), anonymous.error
    assert PASSWORD not in str(refused.error) + str(anonymous.error)
    assert len(sim.calls("/billing/v1/status")) == 1


def test_a_refusing_proxy_is_could_not_connect_and_no_proxy_bypasses_it(
    tls_billing: tuple[BillingSimulator, ServerCert], tinyproxy: Callable[..., Tinyproxy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim, cert = tls_billing
    proxy = tinyproxy(connect_ports=[443])  # tunnels to 443 only: ours is refused
    monkeypatch.setenv("HTTPS_PROXY", proxy.url())
    answer = client(sim, cert).status(IDENTITY, "n")
    assert answer.status is ApiStatus.COULD_NOT_CONNECT
    assert "proxy" in str(answer.error) and "403" in str(answer.error)
    assert sim.calls("/billing/v1/status") == []
    monkeypatch.setenv("NO_PROXY", "127.0.0.2")
    assert client(sim, cert).proxy is None
    assert client(sim, cert).status(IDENTITY, "n").status is ApiStatus.VALID


def test_the_module_is_licensed_through_an_authenticating_proxy(
    tmp_path: Path, tls_billing: tuple[BillingSimulator, ServerCert],
    tinyproxy: Callable[..., Tinyproxy], broker: object,
) -> None:
    sim, cert = tls_billing
    proxy = tinyproxy(auth=("edge", PASSWORD))
    env = {"HTTPS_PROXY": proxy.url(f"edge:{PASSWORD}@"), "NO_PROXY": "", "no_proxy": ""}
    module = Module(tmp_path, broker.port, f"Billing:CaFile={cert.ca}",  # type: ignore[attr-defined]
                    billing=sim.url, public_key=sim.public_key_b64, env=env).start()
    try:
        status = module.status()
        assert status["apiStatus"] == "Valid" and status["serving"] is True
        assert f"CONNECT 127.0.0.2:{sim.port}" in proxy.log()
        assert PASSWORD not in module.log_text()
    finally:
        module.stop()
