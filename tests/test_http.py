"""The HTTP server under hostile clients: real sockets against the real module process.

Idle connections and a slowloris client must not cost threads or unbounded memory, must be
closed after their timeouts, and must not stop `/health` from answering; connections over
`Http:MaxConnections` are refused at once; malformed requests get 400 and oversized bodies
413, never 500 or a traceback; clients that hang up leave no trace in the log; the module
stops promptly with connections still open.
"""

from __future__ import annotations

import http.client
import json
import selectors
import signal
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from edge_module.api.http import HttpApi
from edge_module.api.router import HttpError, Request, Response
from edge_module.config import HttpSettings
from edge_module.errors import ErrorCode
from tests.support import Module, wait_until

TRACEBACK_MARKERS = ("Traceback", "BrokenPipe", "ConnectionResetError", "Exception in ASGI")


def proc_status(pid: int) -> dict[str, int]:
    """Threads and VmRSS (kB) of a process, from /proc/<pid>/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Threads", "VmRSS"):
            fields[key] = int(value.split()[0])
    return fields


def connect(module: Module) -> socket.socket:
    return socket.create_connection(("127.0.0.1", module.http_port), timeout=5)


def exchange(module: Module, data: bytes, wait: float = 3.0) -> bytes:
    """Send raw bytes, then read until the server closes or ``wait`` s pass."""
    with connect(module) as sock:
        sock.sendall(data)
        sock.settimeout(wait)
        answer = b""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            answer += chunk
        return answer


def status_and_body(answer: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def pid_of(module: Module) -> int:
    assert module.process is not None
    return module.process.pid


def test_idle_connections_and_slowloris_cost_no_threads_and_are_closed(
    start_module: Callable[..., Module],
) -> None:
    module = start_module("Http:MaxConnections=600", "Http:IdleTimeoutSeconds=3",
                          "Http:HeaderTimeoutSeconds=1.5", "Http:HandlerThreads=2")
    for path in ("/status", "/metrics", "/ready"):  # start the handler threads
        assert module.http(path)[0] == 200
    before = proc_status(pid_of(module))

    opened = time.monotonic()
    idle = [connect(module) for _ in range(500)]
    slow = connect(module)
    slow.sendall(b"GET /health HTTP/1.1\r\n")
    slow_started = time.monotonic()
    answer = b""
    header = b"X-Slow: 1\r\n"
    for i in range(60):  # one header byte every 0.1 s; the server must cut it at 1.5 s
        try:
            slow.sendall(header[i % len(header):i % len(header) + 1])
        except OSError:
            break
        sel = selectors.DefaultSelector()
        sel.register(slow, selectors.EVENT_READ)
        ready = sel.select(0.1)
        sel.close()
        if ready:
            answer = slow.recv(4096)
            break
    slow_for = time.monotonic() - slow_started
    slow.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"RequestTimeout" in answer and 1.4 <= slow_for < 3.0, slow_for

    during = proc_status(pid_of(module))
    assert module.http("/health") == (200, b'{"status": "alive"}')
    # 501 connections held: the old server had one thread each; now at most the 2 handlers
    assert during["Threads"] <= before["Threads"] + 2, (before, during)
    assert during["VmRSS"] - before["VmRSS"] < 40 * 1024, (before, during)

    sel = selectors.DefaultSelector()
    for sock in idle:
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
    assert sel.select(0) == [], "an idle connection was closed before Http:IdleTimeoutSeconds"
    closed = 0
    deadline = opened + 3 + 4
    while closed < len(idle) and time.monotonic() < deadline:
        for key, _ in sel.select(0.2):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(4096)
            except ConnectionResetError:
                data = b""
            assert data == b"", data  # closed without an answer: nothing was asked
            sel.unregister(sock)
            sock.close()
            closed += 1
    sel.close()
    for sock in idle:
        sock.close()
    assert closed == 500, f"{closed} of 500 idle connections closed by the server"
    assert time.monotonic() - opened >= 3 - 0.5

    # a kept-alive connection is closed after the same idle time once answered
    with connect(module) as kept:
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        reply = b""
        for _ in range(10):  # head and body may come in separate segments
            reply += kept.recv(4096)
            if reply.endswith(b'{"status": "alive"}'):
                break
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b'"alive"}'), reply
        kept.settimeout(3 + 3)
        answered = time.monotonic()
        assert kept.recv(4096) == b""
        assert 2.5 <= time.monotonic() - answered < 6

    after = proc_status(pid_of(module))
    assert after["Threads"] <= before["Threads"] + 2, (before, after)
    assert module.metric("edge_module_http_events_total", 'event="header_timeouts"') == 1
    assert module.metric("edge_module_http_events_total", 'event="idle_closed"') >= 501
    assert module.http("/health")[0] == 200
    assert not [m for m in TRACEBACK_MARKERS if m in module.log_text()], module.log_tail()


def test_connections_over_the_cap_are_refused_at_once_and_stop_is_prompt(
    start_module: Callable[..., Module],
) -> None:
    module = start_module("Http:MaxConnections=10", "Http:IdleTimeoutSeconds=60",
                          "Http:HeaderTimeoutSeconds=60")
    held = [connect(module) for _ in range(10)]
    wait_until(lambda: module.http("/health")[0] == 503, 3, "the 11th connection refused")
    started = time.monotonic()
    status, body = module.http("/ready")
    assert time.monotonic() - started < 0.5
    assert status == 503 and json.loads(body)["error"]["code"] == "Overloaded"
    held.pop().close()
    wait_until(lambda: module.http("/health")[0] == 200, 3, "served again below the cap")
    assert module.metric("edge_module_http_events_total", 'event="refused"') >= 2
    assert module.metric("edge_module_http_connections_open") == 10  # 9 held + this scrape

    # stop with 9 idle connections and a half-sent request still open
    held[0].sendall(b"GET /status HTTP/1.1\r\nHost: t\r\n")
    stopping = time.monotonic()
    module.signal(signal.SIGTERM)
    assert module.wait_exit(15) == 0
    assert time.monotonic() - stopping < 10, module.log_tail()
    for sock in held:
        sock.close()
    assert "module_stopped" in module.log_text()
    assert not [m for m in TRACEBACK_MARKERS if m in module.log_text()], module.log_tail()


def test_malformed_oversized_slow_and_abandoned_requests(
    start_module: Callable[..., Module], tmp_path: Path,
) -> None:
    module = start_module(f"Mounts:Output={tmp_path / 'out'}", "Http:MaxBodyBytes=1000",
                          "Http:BodyTimeoutSeconds=1")

    def get(target: bytes) -> tuple[int, dict[str, object]]:
        return status_and_body(exchange(module, b"GET " + target +
                                        b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"))

    year = b"9" * 5000
    for target in (b"/records/usage-logs/\xd9\xa3/2024",  # raw non-ASCII bytes
                   b"/records/usage-logs/\xff\xfe/2024",
                   b"/records/usage-logs/%C2%B2/2024",  # a superscript two: isdigit() holds
                   b"/records/usage-logs/%D9%A3/2024",  # an Arabic-Indic three
                   b"/records/usage-logs/%FF/2024",  # not UTF-8 once decoded
                   b"/records/usage-logs/1/" + year,
                   b"/records/usage-logs/" + year + b"/1",
                   b"/records/usage-logs/1/2/3",
                   b"/status?x=%FF",
                   b"/records/usage-logs/%00/2024"):
        status, body = get(target)
        assert status == 400, (target[:60], status, body)
        error = body["error"]
        assert isinstance(error, dict | str) and "Traceback" not in json.dumps(body)
    status, body = get(b"/records/usage-logs/1/2024")
    assert status == 404 and "no usage" in json.dumps(body)
    status, body = get(b"/nowhere")
    assert status == 404 and body["error"] == {
        "code": "NotFound", "message": "no route /nowhere", "fix": body["error"]["fix"]}  # type: ignore[index]

    # a body over Http:MaxBodyBytes: refused on its Content-Length, or as it streams in
    answer = exchange(module, b"GET /health HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n")
    assert status_and_body(answer)[0] == 413 and b"PayloadTooLarge" in answer
    assert b"connection: close" in answer.lower()
    chunk = b"258\r\n" + b"x" * 600 + b"\r\n"
    answer = exchange(module, b"GET /ready HTTP/1.1\r\nHost: t\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n" + chunk + chunk)
    assert status_and_body(answer)[0] == 413, answer
    answer = exchange(module, b"GET /health HTTP/1.1\r\nHost: t\r\nContent-Length: 999\r\n\r\n"
                      b"only a little")
    assert status_and_body(answer)[0] == 408 and b"RequestTimeout" in answer
    oversized_head = b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    assert status_and_body(exchange(module, oversized_head))[0] == 400

    # clients that hang up: before the answer, mid-body, and with a reset
    for i in range(20):
        with connect(module) as sock:
            path = (b"/status", b"/metrics", b"/records/usage-logs/")[i % 3]
            sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: t\r\n\r\n")
        with connect(module) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nContent-Length: 500\r\n\r\nabc")
        with connect(module) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
    time.sleep(1.5)  # let the handlers that lost their client finish
    assert module.http("/health")[0] == 200
    assert module.http("/status")[0] == 200
    log = module.log_text()
    assert not [m for m in TRACEBACK_MARKERS if m in log], module.log_tail(60)
    assert "http_handler_failed" not in log and "http_request_failed" not in log
    events = {event: module.metric("edge_module_http_events_total", f'event="{event}"')
              for event in ("malformed", "too_large", "body_timeouts", "handler_errors")}
    assert events == {"malformed": 3, "too_large": 2, "body_timeouts": 1,
                      "handler_errors": 0}, events


def test_router_for_the_routes_to_come_and_a_saturated_handler_pool() -> None:
    """In-process, over real sockets: what OIP v2 routes need, and a pool that is full."""
    settings = HttpSettings.model_validate({"Host": "127.0.0.1", "Port": 0,
                                            "HandlerThreads": 1, "MaxBodyBytes": 64})
    api = HttpApi(settings, lambda: b"", lambda: (True, "serving"))
    release = threading.Event()

    async def infer(request: Request) -> Response:
        return Response.json(200, {"model": request.params["name"],
                                   "version": request.params.get("version"),
                                   "bytes": len(request.body),
                                   "type": request.header("content-type")})

    def stuck(_: Request) -> Response:
        release.wait(10)
        return Response.json(200, {})

    def picky(request: Request) -> Response:
        body = request.json()
        if "inputs" not in body:
            raise HttpError(400, ErrorCode.INVALID_REQUEST, "no inputs", "send inputs")
        return Response(200, b"\x00\x01", "application/octet-stream")

    api.route("POST", "/v2/models/{name}/infer", infer)
    api.route("POST", "/v2/models/{name}/versions/{version}/infer", infer)
    api.route("POST", "/picky", picky)
    api.route("GET", "/stuck", stuck)
    api.start()

    def call(method: str, path: str, body: bytes | None = None,
             ctype: str = "application/json") -> tuple[int, bytes, dict[str, str]]:
        request = urllib.request.Request(f"http://127.0.0.1:{api.port}{path}", data=body,
                                         method=method, headers={"Content-Type": ctype})
        try:
            with urllib.request.urlopen(request, timeout=5) as reply:
                return reply.status, reply.read(), dict(reply.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), dict(exc.headers)

    try:
        status, body, _ = call("POST", "/v2/models/digits/versions/2/infer", b"\xff" * 10,
                               "application/octet-stream")
        assert status == 200 and json.loads(body) == {
            "model": "digits", "version": "2", "bytes": 10, "type": "application/octet-stream"}
        assert json.loads(call("POST", "/v2/models/d%C3%A9/infer/", b"{}")[1])["model"] == "dé"
        assert call("POST", "/picky", b'{"inputs": []}')[:2] == (200, b"\x00\x01")
        status, body, _ = call("POST", "/picky", b"{nope")
        assert status == 400 and json.loads(body)["error"]["code"] == "InvalidJson"
        status, body, _ = call("POST", "/picky", b"{}")
        assert status == 400 and json.loads(body)["error"]["code"] == "InvalidRequest"
        assert call("POST", "/picky", b"x" * 65)[0] == 413
        status, body, headers = call("GET", "/picky")
        assert status == 405 and headers["allow"] == "POST"
        status, body, headers = call("HEAD", "/health")
        assert status == 200 and body == b"" and headers["content-length"] == "19"

        # answers leave at once on a keep-alive connection: TCP_NODELAY on the accepted
        # socket (else an answer's body waits for the client's delayed ACK, ~40 ms)
        keep = http.client.HTTPConnection("127.0.0.1", api.port, timeout=5)
        keep.request("GET", "/health")
        assert keep.getresponse().read() and api.server.open_connections() >= 1
        sockets = [conn.transport.get_extra_info("socket")
                   for conn in api.server.server.server_state.connections]
        assert sockets and all(
            s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in sockets), sockets
        keep.close()

        # one handler thread, stuck: 8 more wait, the next is refused; /health still answers
        waiting = [threading.Thread(target=call, args=("GET", "/stuck")) for _ in range(9)]
        for thread in waiting:
            thread.start()
        wait_until(lambda: api.server.handler_queue() == 8, 5, "1 request stuck, 7 waiting")
        status, body, headers = call("GET", "/ready")
        assert json.loads(body)["error"]["code"] == "Overloaded" and headers["retry-after"] == "1"
        assert call("GET", "/health")[0] == 200
        release.set()
        for thread in waiting:
            thread.join(10)
        assert call("GET", "/ready")[0] == 200
    finally:
        release.set()
        started = time.monotonic()
        api.stop()
        assert time.monotonic() - started < 5


def test_a_client_that_does_not_read_its_answer_is_dropped() -> None:
    settings = HttpSettings.model_validate({"Host": "127.0.0.1", "Port": 0,
                                            "BodyTimeoutSeconds": 1})
    api = HttpApi(settings, lambda: b"", lambda: (True, "serving"))
    big = Response(200, b"x" * (32 * 1024 * 1024), "application/octet-stream")
    api.route("GET", "/big", lambda _: big)
    api.start()
    try:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", api.port))
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
            wait_until(lambda: api.server.counters.write_timeouts == 1, 6,
                       "the stalled answer dropped after Http:BodyTimeoutSeconds")
            wait_until(lambda: api.server.open_connections() == 0, 3, "the connection gone")
            received = 0
            sock.settimeout(5)
            for _ in range(10000):  # what the kernel buffered, then the reset or the end
                try:
                    chunk = sock.recv(1 << 20)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                received += len(chunk)
            assert received < len(big.body)
    finally:
        api.stop()
