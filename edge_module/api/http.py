"""The HTTP API, on the standard library's threading server (no framework needed).

Routes: ``/health`` and ``/ContainerLiveness`` (alive), ``/ready`` and
``/ContainerReadiness`` (200 only when serving), ``/metrics`` (Prometheus
text), and whatever extra routes the app registers (``/status``...).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from edge_module.logs import get_logger

log = get_logger("http")

Handler = Callable[[], tuple[int, Any]]


class HttpApi:
    def __init__(self, host: str, port: int, metrics: Callable[[], bytes],
                 ready: Callable[[], tuple[bool, str]]) -> None:
        self.routes: dict[str, Handler] = {}
        self.prefixes: dict[str, Callable[[str], tuple[int, Any]]] = {}
        self._metrics = metrics
        self._ready = ready
        self.add("/health", lambda: (200, {"status": "alive"}))
        self.add("/ContainerLiveness", lambda: (200, {"status": "alive"}))
        self.add("/ready", self._readiness)
        self.add("/ContainerReadiness", self._readiness)
        api = self

        class RequestHandler(BaseHTTPRequestHandler):
            server_version = "edge-module"
            disable_nagle_algorithm = True  # headers and body go in two writes

            def do_GET(self) -> None:
                api.handle(self)

            def log_message(self, fmt: str, *args: Any) -> None:
                return None  # access logs would flood the module log; metrics count instead

        self.server = ThreadingHTTPServer((host, port), RequestHandler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, name="http",
                                        daemon=True)

    def add(self, path: str, handler: Handler) -> None:
        self.routes[path.rstrip("/") or "/"] = handler

    def add_prefix(self, prefix: str, handler: Callable[[str], tuple[int, Any]]) -> None:
        """Route every path under ``prefix``; the handler gets the rest of the path."""
        self.prefixes[prefix.rstrip("/")] = handler

    def _readiness(self) -> tuple[int, Any]:
        ready, reason = self._ready()
        return (200 if ready else 503), {"ready": ready, "reason": reason}

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        path = request.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            if path == "/metrics":
                self._reply(request, 200, self._metrics(), CONTENT_TYPE_LATEST)
                return
            handler = self.routes.get(path)
            if handler is None:
                for prefix, prefixed in self.prefixes.items():
                    if path == prefix or path.startswith(prefix + "/"):
                        status, body = prefixed(path[len(prefix):].strip("/"))
                        self._json(request, status, body)
                        return
                self._json(request, 404, {"error": f"no route {path}",
                                          "routes": sorted([*self.routes, "/metrics"])})
                return
            status, body = handler()
            self._json(request, status, body)
        except Exception as exc:  # one bad handler must not take the API down
            log.exception("http_handler_failed", path=path)
            self._json(request, 500, {"error": str(exc)})

    def _json(self, request: BaseHTTPRequestHandler, status: int, body: Any) -> None:
        self._reply(request, status, json.dumps(body).encode(), "application/json")

    @staticmethod
    def _reply(request: BaseHTTPRequestHandler, status: int, data: bytes, ctype: str) -> None:
        request.send_response(status)
        request.send_header("Content-Type", ctype)
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    def start(self) -> None:
        self._thread.start()
        log.info("http_listening", port=self.port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
