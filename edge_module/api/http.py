"""The module's HTTP API: its routes, on the bounded server of ``server.py``.

Routes: ``/health`` and ``/ContainerLiveness`` (alive, answered on the event loop so that
they answer even when every handler thread is busy), ``/ready`` and ``/ContainerReadiness``
(200 only when serving), ``/metrics`` (Prometheus text), and whatever the app registers
(``/status``, ``/records/usage-logs/...``). ``add``/``add_prefix`` keep the simple
``() -> (status, body)`` handler shape; ``route`` takes typed :class:`Request` ->
:class:`Response` handlers with method + path patterns (sync ones run in the bounded handler
pool, ``async`` ones on the loop), for routes with bodies such as inference.

Threads: ``http`` (the event loop) and up to ``Http:HandlerThreads`` ``http-handler_<n>``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_module.api.router import AsyncHandler, Response, Router, SyncHandler
from edge_module.api.server import HttpLimits, HttpServer
from edge_module.config import HttpSettings
from edge_module.logs import get_logger

log = get_logger("http")

Handler = Callable[[], tuple[int, Any]]
PrefixHandler = Callable[[str], tuple[int, Any]]


def limits_of(settings: HttpSettings) -> HttpLimits:
    return HttpLimits(
        max_connections=settings.max_connections,
        idle_timeout=settings.idle_timeout_seconds,
        header_timeout=settings.header_timeout_seconds,
        body_timeout=settings.body_timeout_seconds,
        max_body_bytes=settings.max_body_bytes,
        max_header_bytes=settings.max_header_bytes,
        handler_threads=settings.handler_threads,
    )


class _ServerCollector(Collector):
    """The server's connection figures, read at scrape time (no lock: plain ints)."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("edge_module_http_connections_open",
                                "HTTP connections open now (capped by Http:MaxConnections).",
                                value=self.server.open_connections())
        yield GaugeMetricFamily("edge_module_http_handler_queue",
                                "HTTP requests running in or waiting for the handler threads.",
                                value=self.server.handler_queue())
        events = CounterMetricFamily(
            "edge_module_http_events", "HTTP connections refused or closed, and requests "
            "refused, by event.", labels=["event"])
        for event, count in self.server.counters.as_dict().items():
            events.add_metric([event], count)
        yield events


class HttpApi:
    def __init__(self, settings: HttpSettings, metrics: Callable[[], bytes],
                 ready: Callable[[], tuple[bool, str]]) -> None:
        self.router = Router()
        self._registry = CollectorRegistry()
        self._metrics = metrics
        self._ready = ready
        alive = Response.json(200, {"status": "alive"})
        for path in ("/health", "/ContainerLiveness"):
            self.router.add("GET", path, lambda _: alive, blocking=False)
        self.add("/ready", self._readiness)
        self.add("/ContainerReadiness", self._readiness)
        self.router.add("GET", "/metrics", lambda _: Response(
            200, self._metrics() + generate_latest(self._registry), CONTENT_TYPE_LATEST))
        self.server = HttpServer(self.router, settings.host, settings.port, limits_of(settings))
        self.port = self.server.port
        self._registry.register(_ServerCollector(self.server))

    def route(self, method: str, pattern: str, handler: SyncHandler | AsyncHandler, *,
              prefix: bool = False) -> None:
        """Route ``method pattern`` to a typed handler (``async def`` runs on the loop)."""
        is_async = inspect.iscoroutinefunction(handler)
        self.router.add(method, pattern, handler, blocking=not is_async, is_async=is_async,
                        prefix=prefix)

    def add(self, path: str, handler: Handler) -> None:
        """GET ``path`` -> ``handler() -> (status, JSON body)``, run in the handler pool."""
        self.router.add("GET", path, lambda _: Response.json(*handler()))

    def add_prefix(self, prefix: str, handler: PrefixHandler) -> None:
        """GET every path under ``prefix``; the handler gets the rest of the path."""
        self.router.add("GET", prefix,
                        lambda request: Response.json(*handler(request.params["rest"])),
                        prefix=True)

    def _readiness(self) -> tuple[int, Any]:
        ready, reason = self._ready()
        return (200 if ready else 503), {"ready": ready, "reason": reason}

    def start(self) -> None:
        self.server.start()
        log.info("http_listening", port=self.port,
                 max_connections=self.server.limits.max_connections)

    def stop(self) -> None:
        self.server.stop()
