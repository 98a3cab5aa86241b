"""A fake IoT Edge workload API on a unix socket: what ``create_from_edge_environment`` calls.

The IoT Edge security daemon serves it at ``IOTEDGE_WORKLOADURI``. The SDK
asks it for the trust bundle (``GET /trust-bundle``), the CA that signed
edgeHub's server certificate, and to sign its SAS tokens
(``POST /modules/{module}/genid/{generation}/sign``, HMAC-SHA256 with the
module's key). Every call is recorded for tests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    api: WorkloadApi


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def address_string(self) -> str:
        return "workload-socket"

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        api = self.server.api
        path = urlsplit(self.path).path
        api.calls.append(("GET", path))
        if path == "/trust-bundle":
            self._answer(200, {"certificate": api.ca_pem})
        else:
            self._answer(404, {"message": f"no such resource {path}"})

    def do_POST(self) -> None:
        api = self.server.api
        path = unquote(urlsplit(self.path).path)
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length)
        api.calls.append(("POST", path))
        parts = path.strip("/").split("/")
        if len(parts) == 5 and parts[0] == "modules" and parts[2] == "genid" and \
                parts[4] == "sign":
            if parts[1] != api.module_id or parts[3] != api.generation_id:
                self._answer(404, {"message": f"module {parts[1]}/{parts[3]} not found"})
                return
            try:
                request = json.loads(raw)
                data = base64.b64decode(request["data"])
            except (ValueError, KeyError) as exc:
                self._answer(400, {"message": f"bad sign request: {exc}"})
                return
            digest = hmac.new(api.key, data, hashlib.sha256).digest()
            self._answer(200, {"digest": base64.b64encode(digest).decode()})
        else:
            self._answer(404, {"message": f"no such resource {path}"})


class WorkloadApi:
    """Serves the workload API on ``socket_path`` until ``stop``."""

    API_VERSION = "2019-01-30"

    def __init__(self, socket_path: Path, ca_pem: str, module_id: str, generation_id: str,
                 key: bytes) -> None:
        self.socket_path = socket_path
        self.ca_pem = ca_pem
        self.module_id = module_id
        self.generation_id = generation_id
        self.key = key
        self.calls: list[tuple[str, str]] = []
        socket_path.unlink(missing_ok=True)
        self._server = _Server(str(socket_path), _Handler)
        self._server.api = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="workload-api")

    @property
    def uri(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self) -> WorkloadApi:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.socket_path.unlink(missing_ok=True)
