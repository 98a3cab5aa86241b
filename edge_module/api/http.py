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

import hmac
import inspect
from collections.abc import Callable, Iterator
from typing import Any, cast

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_module.api.openapi import openapi, swagger_page
from edge_module.api.router import (
    AsyncHandler,
    HttpError,
    Request,
    Response,
    Router,
    SyncHandler,
)
from edge_module.api.server import HttpLimits, HttpServer
from edge_module.config import HttpSettings
from edge_module.errors import ErrorCode
from edge_module.logs import get_logger
from edge_module.supervisor import Spawn, start_thread

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


def check_key(expected: bytes | None, request: Request) -> None:
    """Raise 401 ``Unauthorized`` unless the request carries ``expected`` (constant time).

    The key is read from ``Authorization: Bearer <key>`` or ``X-Api-Key``; neither it nor
    what the client sent is ever logged or echoed.
    """
    if expected is None:
        return
    sent = request.header("x-api-key")
    auth = request.header("authorization")
    if not sent and auth[:7].lower() == "bearer ":
        sent = auth[7:].strip()
    if not hmac.compare_digest(sent.encode("utf-8", "replace"), expected):
        raise HttpError(401, ErrorCode.UNAUTHORIZED, "this route needs the module's API key",
                        "send Authorization: Bearer <Http:ApiKey> or X-Api-Key: <Http:ApiKey>",
                        {"WWW-Authenticate": "Bearer"})


def _guard(key: bytes, handler: SyncHandler | AsyncHandler) -> SyncHandler | AsyncHandler:
    if inspect.iscoroutinefunction(handler):
        async_handler = cast(AsyncHandler, handler)

        async def guarded_async(request: Request) -> Response:
            check_key(key, request)
            return await async_handler(request)
        return guarded_async
    sync_handler = cast(SyncHandler, handler)

    def guarded(request: Request) -> Response:
        check_key(key, request)
        return sync_handler(request)
    return guarded


class HttpApi:
    def __init__(self, settings: HttpSettings, metrics: Callable[[], bytes],
                 ready: Callable[[], tuple[bool, str]]) -> None:
        self.router = Router()
        self._key = settings.api_key.get_secret_value().encode() \
            if settings.api_key is not None else None
        self._registry = CollectorRegistry()
        self._metrics = metrics
        self._ready = ready
        alive = Response.json(200, {"status": "alive"})
        for path in ("/health", "/ContainerLiveness"):
            self.router.add("GET", path, lambda _: alive, blocking=False)
        self.add("/ready", self._readiness, protected=False)
        self.add("/ContainerReadiness", self._readiness, protected=False)
        self.router.add("GET", "/metrics", lambda _: Response(
            200, self._metrics() + generate_latest(self._registry), CONTENT_TYPE_LATEST))
        self.router.add("GET", "/openapi.json", lambda _: Response.json(
            200, openapi(self.router)), blocking=False)
        self.router.add("GET", "/swagger", lambda _: Response(
            200, swagger_page(openapi(self.router)).encode(), "text/html; charset=utf-8"),
            blocking=False)
        self.server = HttpServer(self.router, settings.host, settings.port, limits_of(settings),
                                 tls=settings.tls)
        self.port = self.server.port
        self._registry.register(_ServerCollector(self.server))

    def route(self, method: str, pattern: str, handler: SyncHandler | AsyncHandler, *,
              prefix: bool = False, protected: bool = True) -> None:
        """Route ``method pattern`` to a typed handler (``async def`` runs on the loop).

        ``protected`` routes need ``Http:ApiKey`` when it is set."""
        is_async = inspect.iscoroutinefunction(handler)
        if protected and self._key is not None:
            handler = _guard(self._key, handler)
        self.router.add(method, pattern, handler, blocking=not is_async, is_async=is_async,
                        prefix=prefix)

    @property
    def key_required(self) -> bool:
        return self._key is not None

    def authorized(self, request: Request) -> bool:
        """True when ``Http:ApiKey`` is unset or ``request`` carries it."""
        try:
            check_key(self._key, request)
        except HttpError:
            return False
        return True

    def add(self, path: str, handler: Handler, *, protected: bool = True) -> None:
        """GET ``path`` -> ``handler() -> (status, JSON body)``, run in the handler pool."""
        self.route("GET", path, lambda _: Response.json(*handler()), protected=protected)

    def add_prefix(self, prefix: str, handler: PrefixHandler) -> None:
        """GET every path under ``prefix``; the handler gets the rest of the path."""
        self.route("GET", prefix,
                   lambda request: Response.json(*handler(request.params["rest"])),
                   prefix=True)

    def _readiness(self) -> tuple[int, Any]:
        ready, reason = self._ready()
        return (200 if ready else 503), {"ready": ready, "reason": reason}

    def start(self, spawn: Spawn = start_thread) -> None:
        self.server.start(spawn=spawn)
        log.info("http_listening", port=self.port,
                 max_connections=self.server.limits.max_connections)

    def stop(self) -> None:
        self.server.stop()
