"""The HTTP server: uvicorn's h11 protocol on one event loop thread, with hard limits.

Threads: ``http`` runs the asyncio event loop (accepting, parsing, timeouts, answering);
in the module the supervisor runs it, so a loop that ends while the module runs is
reported down and started again on the same bound socket. ``http-handler_<n>`` (at most
``Http:HandlerThreads``) run the handlers that may block. No thread is ever started per
connection.

What uvicorn gives (read in its source, 0.54): keep-alive idle timeout *after* a response,
a header size cap (``h11_max_incomplete_event_size``), graceful shutdown with a deadline.
What it lacks, added here in :class:`BoundedH11Protocol`: a timeout for a connection that
never sends a request, a header (slowloris) deadline — uvicorn cancels its keep-alive timer
on every received byte, so a client trickling header bytes is never timed out — and a cap on
open connections that refuses at once (uvicorn's ``limit_concurrency`` keeps the connection
and answers 503 only when a request arrives). The ASGI app here adds the body size limit
(413), the body deadline (408), the handler-pool queue bound (503), turns every handler
failure into a coded JSON 500 with one log line, and cancels an async handler whose client
hangs up while it waits (so an inference nobody will read is abandoned, not billed).

TLS (``Http:Tls``): ``ssl_certfile``/``ssl_keyfile`` and, for mutual TLS,
``ssl_ca_certs`` with ``ssl_cert_reqs=CERT_REQUIRED`` go to ``uvicorn.Config``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, cast
from urllib.parse import parse_qs, unquote_to_bytes

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from edge_module.api.router import (
    HttpError,
    Request,
    Response,
    Route,
    Router,
    normalise,
    oip_error,
)
from edge_module.config import HttpTlsSettings
from edge_module.errors import ErrorCode
from edge_module.logs import get_logger
from edge_module.supervisor import Spawn, start_thread

log = get_logger("http")
QUEUE_PER_THREAD = 8  # requests waiting for a handler thread, per thread, before 503
REFUSED_LINGER_SECONDS = 1.0  # a refused connection is closed after this, or on its first bytes
SHUTDOWN_GRACE_SECONDS = 2  # in-flight requests get this long on stop; then they are cancelled

# uvicorn's own loggers: the module logs what matters itself, once, with a cause and a fix.
logging.getLogger("uvicorn.error").setLevel(logging.ERROR)
logging.getLogger("uvicorn.access").disabled = True


@dataclass(frozen=True)
class HttpLimits:
    max_connections: int = 256
    idle_timeout: float = 30.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_body_bytes: int = 8 * 1024 * 1024
    max_header_bytes: int = 16 * 1024
    handler_threads: int = 4


class Counters:
    """Connection events, updated on the loop thread only (plain ints: reads are safe)."""

    def __init__(self) -> None:
        self.refused = 0
        self.header_timeouts = 0
        self.idle_closed = 0
        self.malformed = 0
        self.too_large = 0
        self.body_timeouts = 0
        self.write_timeouts = 0
        self.overloaded = 0
        self.handler_errors = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


def _raw_reply(status: int, reason: str, code: ErrorCode, message: str, fix: str,
               extra: str = "") -> bytes:
    body = Response.error(status, code, message, fix).body
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n{extra}\r\n").encode() + body


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus the connection cap, idle and header deadlines."""

    limits: ClassVar[HttpLimits]
    counters: ClassVar[Counters]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.limits.idle_timeout  # type: ignore[assignment]
        self._refused = False
        self._header_deadline: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._write_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self._refused = True
            self.transport = transport
            self.counters.refused += 1
            transport.write(_raw_reply(
                503, "Service Unavailable", ErrorCode.OVERLOADED,
                f"{self.limits.max_connections} connections are open (Http:MaxConnections)",
                "retry later, reuse one keep-alive connection, or raise Http:MaxConnections",
                "retry-after: 1\r\n"))
            self._linger = self.loop.call_later(REFUSED_LINGER_SECONDS, transport.close)
            return
        super().connection_made(transport)
        # uvicorn arms its idle timer only after a response: arm it for the first request too.
        self.timeout_keep_alive_task = self.loop.call_later(self.limits.idle_timeout,
                                                            self._idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._header_deadline, self._linger, self._write_deadline):
            if timer is not None:
                timer.cancel()
        if self._refused:
            return
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:  # the 503 is already written: read the request, then close
            self.transport.close()
            return
        if self.conn.their_state is h11.IDLE and self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.limits.header_timeout,
                                                         self._header_timeout)
        super().data_received(data)
        if self._header_deadline is not None and (
                self.conn.their_state is not h11.IDLE or self.transport.is_closing()):
            self._header_deadline.cancel()
            self._header_deadline = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # replace uvicorn's handler with ours
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = self.loop.call_later(self.limits.idle_timeout,
                                                                self._idle_timeout)

    def pause_writing(self) -> None:
        """The client does not read fast enough: give it Http:BodyTimeoutSeconds to catch up."""
        if self._refused:
            return
        super().pause_writing()
        if self._write_deadline is None:
            self._write_deadline = self.loop.call_later(self.limits.body_timeout,
                                                        self._write_timeout)

    def resume_writing(self) -> None:
        if self._refused:
            return
        super().resume_writing()
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None

    def _write_timeout(self) -> None:
        self._write_deadline = None
        self.counters.write_timeouts += 1
        self.transport.abort()  # connection_lost wakes the waiting send; nothing is logged

    def _idle_timeout(self) -> None:
        if not self.transport.is_closing():
            self.counters.idle_closed += 1
        self.timeout_keep_alive_handler()

    def _header_timeout(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        self.counters.header_timeouts += 1
        self.transport.write(_raw_reply(
            408, "Request Timeout", ErrorCode.REQUEST_TIMEOUT,
            f"request headers not complete within {self.limits.header_timeout:g} s "
            "(Http:HeaderTimeoutSeconds)", "send the whole request head at once"))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        self.counters.malformed += 1
        self.transport.write(_raw_reply(
            400, "Bad Request", ErrorCode.INVALID_REQUEST,
            "malformed HTTP request: bad request line, non-ASCII bytes in the target, bad "
            f"headers, or a request head over {self.limits.max_header_bytes} bytes",
            "percent-encode the path and query; keep headers under Http:MaxHeaderBytes"))
        self.transport.close()


class _Overloaded(Exception):
    pass


class _ClientGone(Exception):
    """The client closed the connection before its request was complete."""


class AsgiApp:
    """The ASGI application: reads the request within the limits and runs the route."""

    def __init__(self, router: Router, limits: HttpLimits, counters: Counters) -> None:
        self.router = router
        self.limits = limits
        self.counters = counters
        self.pool = ThreadPoolExecutor(limits.handler_threads, thread_name_prefix="http-handler")
        self.queued = 0  # requests given to the pool and not finished (loop thread only)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        try:
            response, close = await self._respond(scope, receive)
        except _ClientGone:
            return  # nobody to answer; uvicorn closes the connection
        except Exception as exc:  # never a traceback in a response or the log
            log.error("http_request_failed", path=scope.get("path", ""),
                      error=f"{type(exc).__name__}: {exc}",
                      fix="a bug in the module: report it with this line")
            response, close = Response.error(500, ErrorCode.INTERNAL, "the request failed",
                                             "retry; if it persists, report the module log "
                                             "line http_request_failed"), True
        if scope.get("path", "").startswith("/v2"):
            response = oip_error(response)
        headers = [(b"content-type", response.content_type.encode()),
                   (b"content-length", str(len(response.body)).encode())]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1"))
                    for k, v in response.headers.items()]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": response.status,
                    "headers": headers})
        body = b"" if scope["method"] == "HEAD" else response.body
        await send({"type": "http.response.body", "body": body})

    async def _respond(self, scope: dict[str, Any], receive: Any) -> tuple[Response, bool]:
        """The response, and whether the connection must close (request not fully read)."""
        try:
            method = scope["method"].upper()
            path = self._path(scope)
            query = self._query(scope)
            headers: dict[str, str] = {}
            for name, value in scope["headers"]:
                key = name.decode("latin-1")
                headers[key] = f"{headers[key]}, {value.decode('latin-1')}" \
                    if key in headers else value.decode("latin-1")
            self._check_declared_length(headers)
            found = self.router.match(method, path)
            if isinstance(found, Response):  # 404/405: close rather than read a body
                return found, "content-length" in headers or "transfer-encoding" in headers
            route, params = found
            body = await self._body(headers, receive)
        except HttpError as exc:
            return exc.response, exc.response.status in (408, 413)
        client = scope.get("client")
        request = Request(method, path, query, headers, body,
                          f"{client[0]}:{client[1]}" if client else "", params)
        return await self._run(route, request, receive), False

    @staticmethod
    def _path(scope: dict[str, Any]) -> str:
        raw = scope.get("raw_path") or scope["path"].encode()
        try:
            path = unquote_to_bytes(raw.split(b"?", 1)[0]).decode("utf-8")
        except UnicodeDecodeError:
            raise HttpError(400, ErrorCode.INVALID_REQUEST,
                            "the path is not valid UTF-8 once percent-decoded",
                            "percent-encode UTF-8 text in paths") from None
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
            raise HttpError(400, ErrorCode.INVALID_REQUEST, "the path holds control characters",
                            "remove control characters from the path")
        return normalise(path)

    @staticmethod
    def _query(scope: dict[str, Any]) -> dict[str, list[str]]:
        try:
            return parse_qs(scope["query_string"].decode("ascii"), keep_blank_values=True,
                            errors="strict", max_num_fields=100)
        except (UnicodeDecodeError, ValueError):
            raise HttpError(400, ErrorCode.INVALID_REQUEST,
                            "the query string is not valid (non-UTF-8 or over 100 fields)",
                            "percent-encode UTF-8 text in the query; send fewer fields") from None

    def _check_declared_length(self, headers: dict[str, str]) -> None:
        declared = headers.get("content-length")
        if declared is not None and (len(declared) > 15 or not declared.isdigit()
                                     or int(declared) > self.limits.max_body_bytes):
            self.counters.too_large += 1
            raise self._too_large()

    async def _body(self, headers: dict[str, str], receive: Any) -> bytes:
        limit = self.limits.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _ClientGone
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        self.counters.too_large += 1
                        raise self._too_large()
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            self.counters.body_timeouts += 1
            raise HttpError(408, ErrorCode.REQUEST_TIMEOUT,
                            f"request body not complete within {self.limits.body_timeout:g} s "
                            "(Http:BodyTimeoutSeconds)", "send the body at once") from None
        return b"".join(chunks)

    def _too_large(self) -> HttpError:
        return HttpError(413, ErrorCode.PAYLOAD_TOO_LARGE,
                         f"the request body is over {self.limits.max_body_bytes} bytes "
                         "(Http:MaxBodyBytes)", "send a smaller body or raise Http:MaxBodyBytes")

    async def _run(self, route: Route, request: Request, receive: Any = None) -> Response:
        try:
            if route.is_async:
                return await self._unless_gone(
                    cast(Any, route.handler)(request), receive)
            if not route.blocking:
                return cast(Any, route.handler)(request)  # type: ignore[no-any-return]
            if self.queued >= self.limits.handler_threads * QUEUE_PER_THREAD:
                raise _Overloaded
            self.queued += 1
            try:
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self.pool, _call, route, request)
            finally:
                self.queued -= 1
        except HttpError as exc:
            return exc.response
        except _ClientGone:
            raise
        except _Overloaded:
            self.counters.overloaded += 1
            return Response.error(
                503, ErrorCode.OVERLOADED,
                f"{self.queued} requests are waiting for the {self.limits.handler_threads} "
                "handler threads", "retry later or raise Http:HandlerThreads",
                {"Retry-After": "1"})
        except Exception as exc:  # one bad handler must not take the API down
            self.counters.handler_errors += 1
            log.error("http_handler_failed", method=request.method, path=request.path,
                      route=route.pattern, error=f"{type(exc).__name__}: {exc}",
                      fix="a bug in the module: report it with this line")
            return Response.error(500, ErrorCode.INTERNAL,
                                  f"the handler for {route.pattern} failed "
                                  f"({type(exc).__name__})",
                                  "retry; if it persists, report the module log line "
                                  "http_handler_failed")

    @staticmethod
    async def _unless_gone(handling: Any, receive: Any) -> Response:
        """Await an async handler, cancelling it when the client hangs up meanwhile: an
        inference handler then abandons its input, so an answer nobody reads is not billed
        (``transport/http.py``). Raises ``_ClientGone`` then."""
        if receive is None:
            return cast(Response, await handling)
        handler = asyncio.ensure_future(handling)
        watcher = asyncio.ensure_future(_hang_up(receive))
        try:
            await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not handler.done():
                handler.cancel()
            watcher.cancel()
        if not handler.done() or handler.cancelled():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await handler  # let its clean-up (``abandon``) run
            raise _ClientGone
        return cast(Response, handler.result())


async def _hang_up(receive: Any) -> None:
    """Return when the client closes the connection: after the body, uvicorn's ``receive``
    answers ``http.disconnect`` only then."""
    for _ in range(1000):  # bounded: a stream of other events stops the watch
        message = await receive()
        if message.get("type") == "http.disconnect":
            return
    await asyncio.Event().wait()


def _call(route: Route, request: Request) -> Response:
    response = cast(Any, route.handler)(request)
    if not isinstance(response, Response):
        raise TypeError(f"handler returned {type(response).__name__}, not Response")
    return response


def _listen(host: str, port: int) -> socket.socket:
    """Bind now, so that a port in use fails at start-up (the caller turns it into advice)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on sockets whose proto is
    # IPPROTO_TCP, and accepted sockets inherit the listener's. Without it an answer's
    # head and body leave in two segments and the second waits for the client's delayed
    # ACK: ~40 ms on every keep-alive request (measured: 52 ms p50 against 10 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _tls_arguments(tls: HttpTlsSettings | None) -> dict[str, Any]:
    """uvicorn's ssl arguments: TLS when a certificate is set, mTLS with a client CA."""
    if tls is None or tls.cert_file is None:
        return {}
    args: dict[str, Any] = {"ssl_certfile": str(tls.cert_file),
                            "ssl_keyfile": str(tls.key_file)}
    if tls.client_ca_file is not None:
        args.update(ssl_ca_certs=str(tls.client_ca_file), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return args


class HttpServer:
    """Binds at construction; :meth:`start` runs the loop thread, :meth:`stop` ends it."""

    def __init__(self, router: Router, host: str, port: int, limits: HttpLimits,
                 tls: HttpTlsSettings | None = None) -> None:
        self.limits = limits
        self.counters = Counters()
        self.sock = _listen(host, port)
        self.port = int(self.sock.getsockname()[1])
        self.app = AsgiApp(router, limits, self.counters)
        protocol = type("Protocol", (BoundedH11Protocol,),
                        {"limits": limits, "counters": self.counters})
        config = uvicorn.Config(
            self.app, http=protocol, ws="none", lifespan="off", interface="asgi3",
            loop="asyncio", log_config=None, access_log=False, proxy_headers=False,
            server_header=False, h11_max_incomplete_event_size=limits.max_header_bytes,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS, backlog=1024,
            **_tls_arguments(tls),
        )
        self.config = config
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._runs = 0
        self._stopping = False
        self._swap = threading.Lock()  # a restart's new server, against stop()

    def _run(self) -> None:
        """One run of the event loop, until uvicorn stops. Under the supervisor a run that
        ends while the module is running is a dead thread: it is restarted with a fresh
        uvicorn server on the same bound socket, and ``/ready`` names it meanwhile."""
        with self._swap:
            if self._stopping:
                return
            if self._runs:
                self.server = uvicorn.Server(self.config)
                log.info("http_listening", port=self.port, restarted=True)
            self._runs += 1
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # SystemExit from uvicorn included
            log.error("http_server_stopped", error=f"{type(exc).__name__}: {exc}",
                      effect="the HTTP API is down until the server runs again",
                      fix="none needed if thread_restarted follows; else report the log")
            raise
        finally:
            self._started.set()

    async def _serve(self) -> None:
        # A duplicate of the bound socket: uvicorn closes the sockets it served on, and a
        # restarted run must find the port still bound (no window for another process).
        task = asyncio.create_task(self.server.serve(sockets=[self.sock.dup()]))
        while not self.server.started and not task.done():
            await asyncio.sleep(0.01)
        self._started.set()
        await task

    def start(self, timeout: float = 10.0, spawn: Spawn = start_thread) -> None:
        self._thread = spawn("http", self._run)
        self._started.wait(timeout)

    def open_connections(self) -> int:
        return len(self.server.server_state.connections)

    def handler_queue(self) -> int:
        """Requests given to the handler threads and not finished (running or waiting)."""
        return self.app.queued

    def stop(self, timeout: float = 5.0) -> None:
        """Stop within ``timeout`` s even with idle or half-sent connections open."""
        with self._swap:
            self._stopping = True
            self.server.should_exit = True
        thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join(max(0.1, timeout - 1.0))
        if thread is not None and thread.is_alive():
            self.server.force_exit = True
            thread.join(1.0)
        self.app.pool.shutdown(wait=False, cancel_futures=True)
        self.sock.close()
