"""``edge-module diagnose``: every link between the module and its billing endpoint.

Checks, in order, each with PASS/WARN/FAIL and a concrete fix: the URL, proxy
settings, DNS, TCP, TLS (chain and expiry), HTTP reachability, the key's
status, the signed lease, clock skew against the server's ``Date`` header,
and any ``Retry-After``. A later check is skipped (and says why) when an
earlier one it depends on failed. Exit code 0 when nothing failed, 1 otherwise.
"""

from __future__ import annotations

import json
import secrets
import socket
import ssl
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from edge_module import CONTAINER_TYPE, __version__
from edge_module.billing_api import ApiStatus, BillingClient, proxy_for
from edge_module.config import Settings
from edge_module.identity import Identity
from edge_module.licensing.lease import parse_lease, verify_status
from edge_module.licensing.statuses import explain
from edge_module.state import installation_id
from edge_module.trust.keys import DEV_SWITCH, keys_for

MAX_SKEW_S = 300
CERT_WARN_DAYS = 14


@dataclass
class Check:
    name: str
    result: str  # PASS, WARN, FAIL, SKIP
    detail: str
    fix: str = ""


class Diagnosis:
    def __init__(self, settings: Settings, timeout: float = 5.0) -> None:
        self.settings = settings
        self.timeout = timeout
        self.checks: list[Check] = []
        url = urlsplit(settings.billing_url)
        self.scheme = url.scheme
        self.host = url.hostname or ""
        self.port = url.port or (443 if url.scheme == "https" else 80)

    def add(self, name: str, result: str, detail: str, fix: str = "") -> bool:
        self.checks.append(Check(name, result, detail, fix))
        return result in ("PASS", "WARN")

    def skip(self, names: list[str], because: str) -> None:
        for name in names:
            self.add(name, "SKIP", f"not checked: {because}")

    def run(self) -> list[Check]:
        remaining = ["dns", "tcp", "tls", "http", "key", "lease", "clock", "retry-after"]
        self.add("url", "PASS", f"{self.scheme}://{self.host}:{self.port}")
        proxy = proxy_for(self.scheme, self.host)
        if proxy is not None:
            self.add("proxy", "PASS", f"via proxy {proxy.hostname}:{proxy.port} (CONNECT "
                     f"tunnel); NO_PROXY does not exclude {self.host}",
                     "if the proxy blocks the endpoint, add the host to NO_PROXY or allow it")
        else:
            self.add("proxy", "PASS", "direct connection (no HTTPS_PROXY/HTTP_PROXY applies)")
        if not self._dns():
            self.skip(remaining[1:], "DNS failed")
            return self.checks
        if proxy is None and not self._tcp():
            self.skip(remaining[2:], "TCP failed")
            return self.checks
        if self.scheme == "https":
            if proxy is None and not self._tls():
                self.skip(remaining[3:], "TLS failed")
                return self.checks
        else:
            self.add("tls", "WARN", "the endpoint is plain HTTP: the ApiKey travels unencrypted",
                     "use an https:// Billing URL outside test benches")
        self._status()
        return self.checks

    def _dns(self) -> bool:
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            return self.add("dns", "FAIL", f"cannot resolve {self.host}: {exc.strerror}",
                            "check the host name in Billing and the DNS servers "
                            "(/etc/resolv.conf, the container's --dns)")
        addresses = sorted({str(info[4][0]) for info in infos})
        return self.add("dns", "PASS", f"{self.host} -> {', '.join(addresses)}")

    def _tcp(self) -> bool:
        started = time.monotonic()
        try:
            with socket.create_connection((self.host, self.port), timeout=self.timeout):
                pass
        except ConnectionRefusedError:
            return self.add("tcp", "FAIL", f"connection to {self.host}:{self.port} refused",
                            "nothing listens there: check the port in Billing and that the "
                            "endpoint is up")
        except TimeoutError:
            return self.add("tcp", "FAIL", f"no answer from {self.host}:{self.port} within "
                            f"{self.timeout:.0f} s", "a firewall drops the traffic, or the "
                            "endpoint is frozen: open the port outbound / check the endpoint")
        except OSError as exc:
            return self.add("tcp", "FAIL", f"cannot connect: {exc.strerror or exc}",
                            "check routing and firewall rules to the endpoint")
        ms = (time.monotonic() - started) * 1000
        return self.add("tcp", "PASS", f"connected to {self.host}:{self.port} in {ms:.1f} ms")

    def _tls(self) -> bool:
        ca = self.settings.billing.ca_file
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
        try:
            with socket.create_connection((self.host, self.port), timeout=self.timeout) as raw, \
                    context.wrap_socket(raw, server_hostname=self.host) as tls:
                cert = tls.getpeercert() or {}
                version = tls.version()
        except ssl.SSLCertVerificationError as exc:
            return self.add("tls", "FAIL", f"the certificate is not trusted: "
                            f"{exc.verify_message}", "install the endpoint's CA and pass "
                            "Billing:CaFile=<ca.pem>, or fix the server's certificate chain")
        except (ssl.SSLError, OSError) as exc:
            return self.add("tls", "FAIL", f"TLS handshake failed: {exc}",
                            "check that the endpoint speaks TLS on this port")
        not_after = cert.get("notAfter")
        days = None
        if isinstance(not_after, str):
            days = (ssl.cert_time_to_seconds(not_after) - time.time()) / 86400
        subject = _name(cert.get("subject"))
        issuer = _name(cert.get("issuer"))
        detail = f"{version}, certificate {subject} issued by {issuer}"
        if days is not None:
            detail += f", expires in {days:.0f} days"
            if days < CERT_WARN_DAYS:
                return self.add("tls", "WARN", detail,
                                "renew the endpoint's certificate before it expires")
        return self.add("tls", "PASS", detail)

    def _status(self) -> None:
        identity = Identity(CONTAINER_TYPE, __version__, _container_id(self.settings))
        client = BillingClient.from_settings(self.settings, timeout=self.timeout)
        started = time.time()
        nonce = secrets.token_urlsafe(18)
        answer = client.status(identity.as_dict(), nonce)
        client.close()
        if answer.http_status is None:
            self.add("http", "FAIL", f"no HTTP answer: {answer.error}",
                     "the endpoint accepts connections but does not answer: check it, or a "
                     "proxy/firewall that holds the connection")
            self.skip(["key", "lease", "clock", "retry-after"], "no HTTP answer")
            return
        self.add("http", "PASS", f"POST /billing/v1/status answered HTTP {answer.http_status} "
                 f"in {answer.elapsed * 1000:.0f} ms")
        explanation = explain(answer.status)
        if answer.ok:
            self.add("key", "PASS", f"{answer.status}: {explanation.message}")
        else:
            self.add("key", "FAIL", f"{answer.status}: {answer.error or explanation.message}",
                     explanation.remedy)
        self._lease(answer.body, identity, nonce if answer.ok else None)
        if answer.server_date is None:
            self.add("clock", "WARN", "the endpoint sent no Date header; skew unknown")
        else:
            skew = started - answer.server_date
            detail = f"local clock is {abs(skew):.1f} s {'ahead of' if skew > 0 else 'behind'} " \
                     "the endpoint"
            if abs(skew) > MAX_SKEW_S:
                self.add("clock", "FAIL", detail, "synchronise the clock (enable NTP, e.g. "
                         "`timedatectl set-ntp true`); grace is counted in trusted time "
                         "either way, but logs and records get wrong times")
            else:
                self.add("clock", "PASS", detail)
        if answer.retry_after is not None:
            result = "FAIL" if answer.status in (ApiStatus.BUSY, ApiStatus.OUT_OF_QUOTA) \
                else "WARN"
            self.add("retry-after", result, f"the endpoint asks to wait "
                     f"{answer.retry_after:.0f} s ({answer.status})",
                     "nothing to do: the module waits exactly that long before its next call")
        else:
            self.add("retry-after", "PASS", "no Retry-After: the endpoint takes calls now")

    def _lease(self, body: dict[str, Any], identity: Identity, nonce: str | None) -> None:
        lease_obj = body.get("lease")
        if lease_obj is None:
            self.add("lease", "WARN", "the answer carries no lease: no offline grace is granted",
                     "ask the vendor for an endpoint that grants leases")
            return
        keys = keys_for(self.settings)
        if not keys:
            self.add("lease", "WARN", "a lease came, but this development build trusts no "
                     "key, so it cannot be verified and grants no grace",
                     f"set {DEV_SWITCH} to the simulator's public key, or run a release image")
            return
        if nonce is not None:
            lease, problem = verify_status(body, keys, identity, nonce, int(time.time() * 1000),
                                           None)
        else:
            lease, problem = parse_lease(lease_obj, keys, identity)
        if lease is None:
            self.add("lease", "FAIL", f"the lease is not accepted: {problem}",
                     "check that Billing points at the vendor's endpoint and that this image "
                     "carries the vendor's current key")
            return
        self.add("lease", "PASS", f"signed lease verifies; grants {lease.grace_ms / 1000:.0f} s "
                 "of offline grace")


def _name(parts: Any) -> str:
    try:
        return ", ".join(f"{k}={v}" for rdn in parts for k, v in rdn)
    except (TypeError, ValueError):
        return "?"


def _container_id(settings: Settings) -> str:
    try:
        return installation_id(settings.data.path) if settings.data.path.exists() else \
            "00000000-0000-0000-0000-000000000000"
    except OSError:
        return "00000000-0000-0000-0000-000000000000"


def report(checks: list[Check], as_json: bool) -> int:
    failed = any(c.result == "FAIL" for c in checks)
    if as_json:
        print(json.dumps({"ok": not failed, "checkedAt": datetime.now(UTC).isoformat(),
                          "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        for c in checks:
            print(f"{c.result:<5} {c.name:<12} {c.detail}")
            if c.fix and c.result in ("FAIL", "WARN"):
                print(f"{'':<18}fix: {c.fix}")
        print("all checks passed" if not failed else "some checks failed", file=sys.stderr)
    return 1 if failed else 0
