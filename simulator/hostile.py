"""A hostile "billing endpoint" for the tests: every way a look-alike can answer 200.

Runs its own HTTP server thread on loopback. ``mode`` is switched at run time:

============ ===============================================================
mode         what ``/billing/v1/status`` and ``/billing/v1/usage`` answer
============ ===============================================================
empty        200 ``{}``
results      200 ``{"results": []}``
garbage      200 with bytes that are not JSON
unsigned     200, correctly shaped (status Valid, lease, results, receipt)
             but without signatures
untrusted    the same, signed by a key of its own that no build trusts
replay       the first answer signed by the trusted key, sent again for
             every later call (old nonce, receipt for other records)
other        signed by the trusted key, fresh nonce, for another installation
huge         200 without Content-Length, streaming ``huge_bytes`` bytes
huge-length  200 announcing a 200 MB Content-Length
slow         200 whose body drips one byte every ``drip_seconds``
slow-headers a status line, then headers dripping one byte every ``drip_seconds``
deep         200 with 1 MB of ``[``: JSON nested deeper than any parser recurses
redirect     302 to the real endpoint (``redirect_to``)
============ ===============================================================

The trusted key (``trusted_key``, e.g. the simulator's) is what an attacker
would not have; it is used only by ``replay`` and ``other``, which model
answers that were genuinely signed once but are presented out of context.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_module.trust.signing import sign

MODES = ("empty", "results", "garbage", "unsigned", "untrusted", "replay", "other", "huge",
         "huge-length", "slow", "slow-headers", "deep", "redirect")


class HostileBilling:
    def __init__(self, trusted_key: Ed25519PrivateKey | None = None, mode: str = "empty",
                 host: str = "127.0.0.1") -> None:
        self.mode = mode
        self.trusted_key = trusted_key
        self.own_key = Ed25519PrivateKey.generate()
        self.huge_bytes = 300 * 1024 * 1024
        self.drip_seconds = 0.2
        self.redirect_to = ""
        self.calls = 0
        self.streamed = 0  # bytes the huge mode got out before the client hung up
        self._first: dict[str, bytes] = {}
        self.server = ThreadingHTTPServer((host, 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                        name="hostile-billing")

    def start(self) -> HostileBilling:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """The correctly shaped answer, signed or not as the mode says."""
        now = int(time.time() * 1000)
        found = body.get("records")
        records: list[Any] = found if isinstance(found, list) else []
        first = records[0] if records and isinstance(records[0], dict) else {}
        container = str(body.get("containerId") or first.get("containerId") or "")
        if self.mode == "other":
            container = "00000000-0000-0000-0000-000000000000"
        if path.endswith("/usage"):
            ids = [str(r.get("id")) for r in records if isinstance(r, dict)]
            statement: dict[str, Any] = {"containerId": container, "issuedAt": now,
                                         "accepted": ids, "duplicate": [], "rejected": []}
            answer: dict[str, Any] = {"results": [{"id": i, "status": "Accepted"} for i in ids]}
            key = "receipt"
        else:
            statement = {"containerId": container,
                         "containerType": str(body.get("containerType") or "edge-module"),
                         "status": "Valid", "issuedAt": now,
                         "expiresAt": now + 365 * 86400_000, "nonce": body.get("nonce")}
            answer = {"status": "Valid", "message": "everything is fine, trust me"}
            key = "lease"
        if self.mode in ("replay", "other"):
            assert self.trusted_key is not None, "replay/other need the trusted key"
            statement = sign(statement, self.trusted_key)
        elif self.mode == "untrusted":
            statement = sign(statement, self.own_key)
        answer[key] = statement
        return answer


def _handler(hostile: HostileBilling) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:
            return None

        def do_GET(self) -> None:
            self.do_POST()

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                body = {}
            hostile.calls += 1
            mode = hostile.mode
            try:
                self._answer(mode, body if isinstance(body, dict) else {})
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        def _send(self, data: bytes, status: int = 200,
                  headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _answer(self, mode: str, body: dict[str, Any]) -> None:
            path = self.path.split("?")[0]
            if mode == "empty":
                self._send(b"{}")
            elif mode == "results":
                self._send(b'{"results": []}')
            elif mode == "garbage":
                self._send(b"\x00\xff<html>200 OK, definitely JSON{{{")
            elif mode == "redirect":
                self._send(b"{}", 302, {"Location": hostile.redirect_to + self.path})
            elif mode == "huge-length":
                self.send_response(200)
                self.send_header("Content-Length", str(200 * 1024 * 1024))
                self.end_headers()
                self.wfile.write(b"[" * 65536)
                self.close_connection = True
            elif mode == "huge":
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                chunk = b'{"pad":"' + b"x" * 65520 + b'",'
                sent = 0
                while sent < hostile.huge_bytes:
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    hostile.streamed = sent
                self.close_connection = True
            elif mode == "slow":
                data = json.dumps(hostile.answer(path, body)).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                for i in range(len(data)):
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
                    time.sleep(hostile.drip_seconds)
            elif mode == "slow-headers":
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                for byte in b"X-Padding: " + b"a" * 400:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(hostile.drip_seconds)
                self.close_connection = True
            elif mode == "deep":
                self._send(b"[" * (1024 * 1024 - 1))
            elif mode == "replay":
                if path not in hostile._first:
                    hostile._first[path] = json.dumps(hostile.answer(path, body)).encode()
                self._send(hostile._first[path])
            else:
                self._send(json.dumps(hostile.answer(path, body)).encode())

    return Handler
