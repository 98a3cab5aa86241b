"""The billing endpoint simulator: Billing API v1 over HTTP, persisted in SQLite.

* Deduplicates usage records by ``id``: a resend answers ``Duplicate``.
* A key registry: keys valid for a container type, keys of another type
  (``Mismatch``), revoked keys (``ContainerUseUnauthorized``), and a quota of
  metered quantity per key (``OutOfQuota`` once used up).
* Fault modes switched at run time through the admin API, applied to the
  ``/billing/`` routes only (the admin API keeps working):

  ============ =========================================================
  mode         effect
  ============ =========================================================
  none         normal service
  refuse       the connection is reset at once, nothing is answered
  blackhole    the request is read and never answered (the socket stays open)
  busy         503 ``BillingEndpointBusy`` with ``Retry-After``
  quota        429 ``OutOfQuota`` with ``Retry-After``
  slow         answers after ``delaySeconds``
  error500     500 with no body
  drop         usage is committed, then the connection is closed unanswered
  usage-refuse status checks are answered; uploads are reset unread (a relay
               that lets only status through)
  ============ =========================================================

Admin API: ``POST /admin/fault {"mode", "retryAfter", "delaySeconds"}``,
``GET /admin/usage`` (totals), ``GET /admin/records`` (what was received),
``POST /admin/reject {"meter", "reason"}`` (answer ``Rejected`` for a meter),
``POST /admin/bad-request {"id"}`` (answer 400 to any batch holding that id),
``POST /admin/keys {"key", "containerType", "quota", "revoked"}``,
``POST /admin/lease {"graceSeconds", "clockOffsetSeconds", "sign", "tamper",
"licenseDays"}``, ``POST /admin/model-keys {"<model>": "<base64 key>"}`` (granted
in leases and licences, for encrypted models).

Signatures (docs/billing-api.openapi.json): a Valid status answer carries a
lease signed together with the caller's ``nonce``; every usage answer carries
a ``receipt`` signed over the record ids it accepted, found duplicate or
rejected for good, and the container id. Refusals are unsigned. The Ed25519
key is made at first start (``billing-signing-key.pem`` beside the database,
or ``signing_key=``); its public key is written to ``billing-public-key.b64``,
which a development build trusts through ``Development:TrustedKeyFile``.
"""

from __future__ import annotations

import base64
import email.utils
import json
import socket
import ssl
import struct
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_module.metering.usage_log import verify_entries
from edge_module.trust.signing import load_public_key, raw_public, sign
from simulator.billing.store import UsageStore

KEY_HEADER = "Ocp-Apim-Subscription-Key"
MAX_RECORDS = 500
EXPIRY_MS = 30 * 24 * 3600 * 1000
RECORD_FIELDS = {"id", "containerType", "containerVersion", "containerId", "meter",
                 "requestTime", "apiType"}
MODES = {"none", "refuse", "blackhole", "busy", "quota", "slow", "error500", "drop",
         "usage-refuse"}


@dataclass
class KeyInfo:
    container_type: str = "edge-module"
    quota: int | None = None
    revoked: bool = False


@dataclass
class Fault:
    mode: str = "none"
    retry_after: float = 2.0
    delay_seconds: float = 5.0


@dataclass
class LeasePolicy:
    grace_seconds: float = 86400.0
    clock_offset_seconds: float = 0.0  # simulate a server clock that differs (diagnose tests)
    sign: bool = True  # False: answers carry no lease
    tamper: bool = False  # True: leases with a broken signature
    license_days: float = 30.0


@dataclass
class State:
    lease: LeasePolicy = field(default_factory=LeasePolicy)
    keys: dict[str, KeyInfo] = field(default_factory=dict)
    fault: Fault = field(default_factory=Fault)
    reject_meters: dict[str, str] = field(default_factory=dict)
    bad_request_ids: set[str] = field(default_factory=set)
    requests: int = 0
    model_keys: dict[str, str] = field(default_factory=dict)  # model -> base64 AES key
    licenses: dict[str, str] = field(default_factory=dict)  # containerId -> module key
    reconciled: dict[str, dict[str, int]] = field(default_factory=dict)  # entry hash -> qty
    # (time.monotonic(), path, HTTP status or fault mode) of every billing call.
    calls: list[tuple[float, str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    fault_changed: threading.Condition = field(default_factory=threading.Condition)


class BillingSimulator:
    def __init__(self, db_path: Path, host: str = "127.0.0.1", port: int = 0,
                 keys: dict[str, KeyInfo] | None = None,
                 tls: tuple[Path, Path] | None = None,
                 signing_key: Ed25519PrivateKey | None = None) -> None:
        self.store = UsageStore(db_path)
        self.state = State(keys=dict(keys or {"demo-key": KeyInfo()}))
        self.signing_key = signing_key or load_or_create_signing_key(db_path.parent)
        self._lease_cache: dict[str, dict[str, Any]] = {}
        self.public_key_b64 = base64.b64encode(raw_public(self.signing_key.public_key())).decode()
        # The file a development build trusts with Development:TrustedKeyFile=<this path>.
        self.public_key_path = db_path.parent / f"{db_path.stem}-public-key.b64"
        self.public_key_path.write_text(self.public_key_b64 + "\n")
        handler = _handler(self)
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        scheme = "http"
        if tls is not None:  # (certificate chain PEM, private key PEM)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://{host}:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                        name="billing-simulator")

    def start(self) -> BillingSimulator:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.set_fault("none")  # release blackholed requests
        self.server.shutdown()
        self.server.server_close()
        self.store.close()

    def set_fault(self, mode: str, retry_after: float = 2.0, delay_seconds: float = 5.0) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown fault mode {mode!r}; modes: {', '.join(sorted(MODES))}")
        with self.state.fault_changed:
            self.state.fault = Fault(mode, retry_after, delay_seconds)
            self.state.fault_changed.notify_all()

    def log_call(self, path: str, outcome: str) -> None:
        with self.state.lock:
            self.state.calls.append((time.monotonic(), path, outcome))

    def calls(self, path: str = "/billing/v1/usage") -> list[tuple[float, str]]:
        with self.state.lock:
            return [(t, outcome) for t, p, outcome in self.state.calls if p == path]

    def totals(self) -> dict[str, Any]:
        return self.store.totals()

    # -- the API ----------------------------------------------------------

    def authorise(self, key: str | None, container_type: str | None,
                  check_quota: bool = True) -> tuple[int, dict[str, Any]] | None:
        info = self.state.keys.get(key or "")
        if info is None:
            return 401, {"status": "Invalid", "message": "the ApiKey is not valid"}
        if info.revoked:
            return 403, {"status": "ContainerUseUnauthorized",
                         "message": "this key may no longer run containers"}
        if container_type is not None and container_type != info.container_type:
            return 403, {"status": "Mismatch",
                         "message": f"the key is for {info.container_type}, not "
                                    f"{container_type}"}
        if check_quota and info.quota is not None and \
                self.store.quantity_for(key or "") >= info.quota:
            return 429, {"status": "OutOfQuota", "message": "the key's quota is used up"}
        return None

    def now_ms(self) -> int:
        return int((time.time() + self.state.lease.clock_offset_seconds) * 1000)

    def lease(self, container_id: Any, container_type: Any,
              nonce: Any = None) -> dict[str, Any] | None:
        policy = self.state.lease
        if not policy.sign or not isinstance(container_id, str):
            return None
        issued = self.now_ms()
        cached = self._lease_cache.get(container_id)
        if nonce is None and cached is not None and issued - cached["issuedAt"] < 1000 and \
                not policy.tamper:
            return cached  # one signature per second and installation is plenty
        body: dict[str, Any] = {"containerId": container_id,
                                "containerType": str(container_type), "status": "Valid",
                                "issuedAt": issued,
                                "expiresAt": issued + int(policy.grace_seconds * 1000)}
        if isinstance(nonce, str):
            body["nonce"] = nonce[:200]
        if self.state.model_keys:
            body["modelKeys"] = dict(self.state.model_keys)
        lease = sign(body, self.signing_key)
        if policy.tamper:
            lease["expiresAt"] += 365 * 24 * 3600 * 1000
        elif nonce is None:
            self._lease_cache[container_id] = lease
        return lease

    def receipt(self, container_id: Any, accepted: list[str], duplicate: list[str],
                rejected: list[dict[str, Any]]) -> dict[str, Any]:
        """The signed receipt of one usage call (docs/billing-api.openapi.json)."""
        return sign({"containerId": str(container_id), "issuedAt": self.now_ms(),
                     "accepted": accepted, "duplicate": duplicate,
                     "rejected": [r for r in rejected if isinstance(r.get("id"), str)]},
                    self.signing_key)

    def status(self, key: str | None, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        refused = self.authorise(key, body.get("containerType"))
        if refused is not None:
            return refused
        answer: dict[str, Any] = {"status": "Valid",
                                  "message": "the key is valid for this container"}
        lease = self.lease(body.get("containerId"), body.get("containerType"),
                           body.get("nonce"))
        if lease is not None:
            answer["lease"] = lease
        return 200, answer

    def license(self, key: str | None, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        container_type = query.get("containerType", "")
        refused = self.authorise(key, container_type)
        if refused is not None:
            return refused
        container_id, module_key = query.get("containerId"), query.get("modulePublicKey")
        if not container_id or not module_key:
            return 400, {"status": "Unknown",
                         "message": "containerId and modulePublicKey are required"}
        issued = self.now_ms()
        info = self.state.keys[key or ""]
        lic = sign({"licenseId": str(uuid.uuid4()), "containerType": container_type,
                    "containerId": container_id, "issuedAt": issued,
                    "expiresAt": issued + int(self.state.lease.license_days * 86400_000),
                    "quota": info.quota, "modulePublicKey": module_key,
                    "modelKeys": dict(self.state.model_keys)}, self.signing_key)
        self.state.licenses[container_id] = module_key
        return 200, {"status": "Valid", "license": lic}

    def reconcile(self, key: str | None, body: Any) -> tuple[int, dict[str, Any]]:
        refused = self.authorise(key, None, check_quota=False)
        if refused is not None:
            return refused
        entries = body.get("entries") if isinstance(body, dict) else None
        if not isinstance(entries, list) or not entries:
            return 400, {"status": "Unknown", "message": "body must be {\"entries\": [...]}"}
        container_id = str(entries[0].get("containerId"))
        module_key = self.state.licenses.get(container_id)
        if module_key is None:
            return 400, {"status": "Unknown",
                         "message": "no licence was issued to this container"}
        result = verify_entries(entries, load_public_key(module_key))
        if not result.ok:
            return 422, {"status": "Unknown", "verified": False, "problems": result.problems}
        new = 0
        for entry in entries:
            if entry["hash"] not in self.state.reconciled:
                new += 1
                self.state.reconciled[entry["hash"]] = {
                    m["name"]: int(m["quantity"]) for m in entry["meters"]}
        return 200, {"status": "Valid", "verified": True, "entries": len(entries),
                     "newEntries": new, "quantity": result.quantity}

    def usage(self, key: str | None, body: Any) -> tuple[int, dict[str, Any]]:
        if not isinstance(body, dict) or not isinstance(body.get("records"), list):
            return 400, {"status": "Unknown", "message": "body must be {\"records\": [...]}"}
        records = body["records"]
        if len(records) > MAX_RECORDS:
            return 400, {"status": "Unknown",
                         "message": f"at most {MAX_RECORDS} records per call"}
        types = {r.get("containerType") for r in records if isinstance(r, dict)}
        refused = self.authorise(key, next(iter(types)) if len(types) == 1 else None,
                                 check_quota=False)
        if refused is not None:
            return refused
        bad = [r for r in records if isinstance(r, dict) and
               r.get("id") in self.state.bad_request_ids]
        if bad:
            return 400, {"status": "Unknown", "message": "malformed record in batch",
                         "receipt": self.receipt(
                             bad[0].get("containerId"), [], [],
                             [{"id": r["id"], "reason": "malformed record"} for r in bad])}
        info = self.state.keys[key or ""]
        now_ms = int(time.time() * 1000)
        results: list[dict[str, Any]] = []
        valid: list[dict[str, Any]] = []
        for record in records:
            problem = _validate(record, now_ms)
            if problem is None and record["meter"]["name"] in self.state.reject_meters:
                problem = self.state.reject_meters[record["meter"]["name"]]
            if problem is not None:
                rid = record.get("id") if isinstance(record, dict) else None
                results.append({"id": rid, "status": "Rejected", "reason": problem})
            else:
                valid.append(record)
        if info.quota is not None:  # resends are answered Duplicate and cost no quota
            known = self.store.known_ids([r["id"] for r in valid])
            wanted = sum(int(r["meter"]["quantity"]) for r in valid if r["id"] not in known)
            if self.store.quantity_for(key or "") + wanted > info.quota:
                return 429, {"status": "OutOfQuota", "message": "the key's quota is used up"}
        inserted = self.store.insert(key or "", valid, now_ms)
        for record in valid:
            results.append({"id": record["id"],
                            "status": "Accepted" if record["id"] in inserted else "Duplicate"})
        first = records[0] if records and isinstance(records[0], dict) else {}
        answer: dict[str, Any] = {"results": results, "receipt": self.receipt(
            first.get("containerId"),
            [r["id"] for r in results if r["status"] == "Accepted"],
            [r["id"] for r in results if r["status"] == "Duplicate"],
            [{"id": r["id"], "reason": r["reason"]} for r in results
             if r["status"] == "Rejected"])}
        lease = self.lease(first.get("containerId"), first.get("containerType"))
        if lease is not None:
            answer["lease"] = lease
        return 200, answer


def load_or_create_signing_key(folder: Path) -> Ed25519PrivateKey:
    """The simulator's lease-signing key, made at first start; the public key beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    pem_path = folder / "billing-signing-key.pem"
    if pem_path.exists():
        key = serialization.load_pem_private_key(pem_path.read_bytes(), password=None)
        assert isinstance(key, Ed25519PrivateKey)
    else:
        key = Ed25519PrivateKey.generate()
        pem_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        pem_path.chmod(0o600)
    public = base64.b64encode(raw_public(key.public_key())).decode()
    (folder / "billing-public-key.b64").write_text(public + "\n")
    return key


def _validate(record: Any, now_ms: int) -> str | None:
    if not isinstance(record, dict):
        return "Malformed: a record must be an object"
    missing = RECORD_FIELDS - set(record)
    if missing:
        return f"Malformed: missing {', '.join(sorted(missing))}"
    extra = set(record) - RECORD_FIELDS
    if extra:
        return f"Malformed: unexpected {', '.join(sorted(extra))}"
    meter = record["meter"]
    if not isinstance(meter, dict) or not isinstance(meter.get("quantity"), int) \
            or meter["quantity"] < 1 or not isinstance(meter.get("name"), str):
        return "Malformed: meter must be {name, quantity >= 1}"
    if not isinstance(record["requestTime"], int):
        return "Malformed: requestTime must be epoch milliseconds"
    if now_ms - record["requestTime"] > EXPIRY_MS:
        return "Expired: requestTime is more than 30 days old"
    return None


def _handler(sim: BillingSimulator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real endpoints do
        server_version = "billing-simulator"
        disable_nagle_algorithm = True  # headers and body go in two writes

        def log_message(self, fmt: str, *args: Any) -> None:
            return None

        def date_time_string(self, timestamp: float | None = None) -> str:
            # The Date header follows the simulated server clock (clock-skew tests).
            return email.utils.formatdate(sim.now_ms() / 1000, usegmt=True)

        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                return json.loads(raw) if raw else {}
            except ValueError:
                return None

        def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _reset(self) -> None:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

        def do_GET(self) -> None:
            if self.path.startswith("/admin/usage"):
                self._send(200, {**sim.store.totals(), "requests": sim.state.requests})
            elif self.path.startswith("/admin/records"):
                self._send(200, {"records": sim.store.records()})
            elif self.path.startswith("/billing/v1/license"):
                query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
                status, answer = sim.license(self.headers.get(KEY_HEADER), query)
                sim.log_call("/billing/v1/license", str(status))
                self._send(status, answer)
            elif self.path.startswith("/admin/fault"):
                fault = sim.state.fault
                self._send(200, {"mode": fault.mode, "retryAfter": fault.retry_after,
                                 "delaySeconds": fault.delay_seconds})
            else:
                self._send(404, {"message": f"no route {self.path}"})

        def do_POST(self) -> None:
            if self.path.startswith("/admin/"):
                self._admin()
                return
            body = self._body()
            fault = sim.state.fault
            if fault.mode == "usage-refuse" and self.path != "/billing/v1/usage":
                fault = Fault("none", fault.retry_after, fault.delay_seconds)
            if fault.mode == "usage-refuse":  # a relay that passes status checks only
                fault = Fault("refuse", fault.retry_after, fault.delay_seconds)
            if fault.mode not in ("none", "slow", "drop"):
                sim.log_call(self.path, fault.mode)
            if fault.mode == "refuse":
                self._reset()
                return
            if fault.mode == "blackhole":
                with sim.state.fault_changed:
                    sim.state.fault_changed.wait_for(
                        lambda: sim.state.fault.mode != "blackhole", timeout=3600)
                self._reset()
                return
            if fault.mode == "busy":
                self._send(503, {"status": "BillingEndpointBusy", "message": "try later"},
                           {"Retry-After": _seconds(fault.retry_after)})
                return
            if fault.mode == "quota":
                self._send(429, {"status": "OutOfQuota", "message": "quota used up"},
                           {"Retry-After": _seconds(fault.retry_after)})
                return
            if fault.mode == "error500":
                self._send(500, None)
                return
            if fault.mode == "slow":
                time.sleep(fault.delay_seconds)
            key = self.headers.get(KEY_HEADER)
            with sim.state.lock:
                sim.state.requests += 1
            if self.path == "/billing/v1/status":
                status, answer = sim.status(key, body if isinstance(body, dict) else {})
            elif self.path == "/billing/v1/usage":
                status, answer = sim.usage(key, body)
            elif self.path == "/billing/v1/reconcile":
                status, answer = sim.reconcile(key, body)
            else:
                status, answer = 404, {"message": f"no route {self.path}"}
            if fault.mode == "drop" and self.path == "/billing/v1/usage":
                sim.log_call(self.path, "drop")
                self._reset()  # committed, but the answer is lost
                return
            sim.log_call(self.path, str(status))
            self._send(status, answer)

        def _admin(self) -> None:
            body = self._body() or {}
            if self.path == "/admin/fault":
                try:
                    sim.set_fault(str(body.get("mode", "none")),
                                  float(body.get("retryAfter", 2.0)),
                                  float(body.get("delaySeconds", 5.0)))
                except ValueError as exc:
                    self._send(400, {"message": str(exc)})
                    return
                self._send(200, {"mode": sim.state.fault.mode})
            elif self.path == "/admin/reject":
                sim.state.reject_meters[str(body["meter"])] = str(body.get("reason",
                                                                           "Rejected"))
                self._send(200, {"rejecting": sorted(sim.state.reject_meters)})
            elif self.path == "/admin/bad-request":
                sim.state.bad_request_ids.add(str(body["id"]))
                self._send(200, {"badRequestIds": sorted(sim.state.bad_request_ids)})
            elif self.path == "/admin/lease":
                policy = sim.state.lease
                sim._lease_cache.clear()
                policy.grace_seconds = float(body.get("graceSeconds", policy.grace_seconds))
                policy.clock_offset_seconds = float(body.get("clockOffsetSeconds",
                                                             policy.clock_offset_seconds))
                policy.sign = bool(body.get("sign", policy.sign))
                policy.tamper = bool(body.get("tamper", policy.tamper))
                policy.license_days = float(body.get("licenseDays", policy.license_days))
                self._send(200, {"graceSeconds": policy.grace_seconds})
            elif self.path == "/admin/model-keys":
                sim.state.model_keys.update({str(k): str(v) for k, v in body.items()})
                self._send(200, {"models": sorted(sim.state.model_keys)})
            elif self.path == "/admin/keys":
                sim.state.keys[str(body["key"])] = KeyInfo(
                    str(body.get("containerType", "edge-module")), body.get("quota"),
                    bool(body.get("revoked", False)))
                self._send(200, {"keys": len(sim.state.keys)})
            else:
                self._send(404, {"message": f"no route {self.path}"})

    return Handler


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
