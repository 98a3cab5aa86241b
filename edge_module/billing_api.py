"""Client of the Billing API v1 (docs/billing-api.openapi.json): status and usage calls.

Every answer is mapped to one of the Azure AI containers statuses: Valid,
Invalid, Mismatch, ContainerUseUnauthorized, OutOfQuota, BillingEndpointBusy,
CouldNotConnect (no connection or a timeout), Unknown (anything else). Fields
the client does not know are ignored, so the API can grow (leases, licences).
An HTTP 200 only says the transport worked: whether it may let the module
serve is decided by the caller, who verifies the signed statement or receipt
in it (licensing/, metering/drain.py).

Bounded, whatever the endpoint does: urllib3 with a connection pool (no
client-wide lock, so a slow call never holds up another thread's call), a
total deadline per call (connect + send + the full read, enforced by a
watchdog that shuts the socket), a body cap (``MAX_BODY``), no redirects and
no compressed bodies (a 1 MB gzip can unpack to gigabytes). ``HTTPS_PROXY`` /
``HTTP_PROXY`` / ``NO_PROXY`` are honoured; proxy credentials come from the
proxy URL and never appear in errors. Runs on the caller's thread.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import socket
import ssl
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, unquote, urlsplit

import urllib3
import urllib3.connection

if TYPE_CHECKING:
    from edge_module.config import Settings

KEY_HEADER = "Ocp-Apim-Subscription-Key"
MAX_BODY = 1 << 20  # no billing answer is near this; more is an attack or a broken proxy


class ApiStatus(StrEnum):
    VALID = "Valid"
    INVALID = "Invalid"
    MISMATCH = "Mismatch"
    COULD_NOT_CONNECT = "CouldNotConnect"
    OUT_OF_QUOTA = "OutOfQuota"
    BUSY = "BillingEndpointBusy"
    UNAUTHORIZED = "ContainerUseUnauthorized"
    UNKNOWN = "Unknown"


@dataclass
class Answer:
    """One call's outcome. ``body`` is the parsed JSON (``{}`` when there was none)."""

    status: ApiStatus
    http_status: int | None = None
    body: dict[str, Any] = field(default_factory=dict)
    retry_after: float | None = None
    error: str | None = None
    server_date: float | None = None  # the server's Date header, epoch seconds
    elapsed: float = 0.0
    proven: bool = False  # a caller verified the signed statement or receipt in it

    @property
    def ok(self) -> bool:
        return self.status is ApiStatus.VALID


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def status_from_http(code: int, body: dict[str, Any]) -> ApiStatus:
    named = body.get("status")
    if code == 200:
        return ApiStatus.VALID
    if code == 401:
        return ApiStatus.INVALID
    if code == 403:
        return ApiStatus.UNAUTHORIZED if named == ApiStatus.UNAUTHORIZED else ApiStatus.MISMATCH
    if code == 429:
        return ApiStatus.OUT_OF_QUOTA
    if code == 503:
        return ApiStatus.BUSY
    return ApiStatus.UNKNOWN


_CALL = threading.local()  # .deadline: the monotonic time the current call must end by


class _DeadlineHead:
    """Ends the wait for a response head at the call's deadline.

    urllib3's read timeout bounds each socket read, so a peer that sends one byte of
    its status line or headers every (timeout - 1) seconds could hold a call forever;
    the body is bounded by ``_read``'s watchdog, the head by this one: at the deadline
    the socket is shut down, which ends the blocked read with an error.
    """

    sock: Any

    def getresponse(self) -> Any:
        deadline = getattr(_CALL, "deadline", None)
        sock = self.sock
        timer = None
        if deadline is not None and sock is not None:
            def cut() -> None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            timer = threading.Timer(max(0.0, deadline - time.monotonic()), cut)
            timer.daemon = True
            timer.start()
        try:
            return super().getresponse()  # type: ignore[misc]
        finally:
            if timer is not None:
                timer.cancel()


class _HTTPConnection(_DeadlineHead, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_DeadlineHead, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class BillingClient:
    def __init__(self, base_url: str, api_key: str, timeout: float = 10.0,
                 ca_file: str | None = None, max_body: int = MAX_BODY) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.origin = f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}"
        self._key = api_key
        self.timeout = timeout
        self.max_body = max_body
        context = ssl.create_default_context(cafile=ca_file) \
            if parts.scheme == "https" else None
        proxy = proxy_for(self.scheme, self.host)
        self._secrets = [api_key] if api_key else []
        self.proxy: str | None = None
        self._pool: urllib3.PoolManager
        if proxy is not None:
            headers = None
            if proxy.username:
                credentials = f"{unquote(proxy.username)}:{unquote(proxy.password or '')}"
                headers = urllib3.make_headers(proxy_basic_auth=credentials)
                self._secrets += [s for s in (proxy.password, unquote(proxy.password or ""))
                                  if s]
            self.proxy = f"{proxy.scheme}://{proxy.hostname}:{proxy.port or 80}"
            self._pool = urllib3.ProxyManager(self.proxy, proxy_headers=headers, num_pools=2,
                                              maxsize=4, ssl_context=context)
        else:
            self._pool = urllib3.PoolManager(num_pools=2, maxsize=4, ssl_context=context)
        self._pool.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}

    @classmethod
    def from_settings(cls, settings: Settings, timeout: float) -> BillingClient:
        """The one way the module builds its client: URL, key, CA file and ``timeout``."""
        ca = str(settings.billing.ca_file) if settings.billing.ca_file else None
        return cls(settings.billing_url, settings.key, timeout=timeout, ca_file=ca)

    def close(self) -> None:
        self._pool.clear()

    def post(self, path: str, body: dict[str, Any]) -> Answer:
        return self._request("POST", path, json.dumps(body, separators=(",", ":")).encode())

    def post_raw_usage(self, records: list[str]) -> Answer:
        """POST /usage with records already serialised (the uploader's fast path)."""
        data = ('{"records":[' + ",".join(records) + "]}").encode()
        return self._request("POST", "/billing/v1/usage", data)

    def get(self, path: str) -> Answer:
        return self._request("GET", path, None)

    def _request(self, method: str, path: str, data: bytes | None) -> Answer:
        headers = {KEY_HEADER: self._key, "Accept": "application/json",
                   "Accept-Encoding": "identity"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        started = time.monotonic()
        deadline = started + self.timeout
        _CALL.deadline = deadline  # the connection cuts a head that is still coming then
        reply: urllib3.BaseHTTPResponse | None = None
        for attempt in (1, 2):  # one silent retry when a kept-alive socket went stale
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return self._failed("timed out", started)
            try:
                reply = self._pool.request(
                    method, self.origin + self.prefix + path, body=data, headers=headers,
                    preload_content=False, redirect=False, retries=False,
                    timeout=urllib3.Timeout(connect=remaining, read=remaining))
                break
            except urllib3.exceptions.ProtocolError as exc:
                if attempt == 2:
                    return self._failed(self._describe(exc), started)
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                return self._failed(self._describe(exc), started)
        assert reply is not None
        raw, problem = self._read(reply, deadline)
        if problem is not None:
            reply.close()  # the rest of a bad answer is never read: drop the connection
        reply.release_conn()
        elapsed = time.monotonic() - started
        if problem is not None:
            return Answer(ApiStatus.UNKNOWN if problem != "timed out" else
                          ApiStatus.COULD_NOT_CONNECT, reply.status, {}, error=problem,
                          elapsed=elapsed)
        try:
            parsed = json.loads(raw) if raw else {}
        except (ValueError, RecursionError):  # deep nesting recurses past Python's limit
            parsed = {}
        if not isinstance(parsed, dict):
            parsed = {}
        server_date = None
        if reply.headers.get("Date"):
            try:
                server_date = email.utils.parsedate_to_datetime(
                    reply.headers.get("Date", "")).timestamp()
            except (TypeError, ValueError):
                server_date = None
        error = None
        if reply.status != 200:
            error = str(parsed.get("message") or reply.reason or f"HTTP {reply.status}")
            if 300 <= reply.status < 400:
                error = f"HTTP {reply.status} redirect to {reply.headers.get('Location', '?')!r}"\
                    " (redirects are never followed)"
        return Answer(
            status=status_from_http(reply.status, parsed),
            http_status=reply.status,
            body=parsed,
            retry_after=parse_retry_after(reply.headers.get("Retry-After")),
            error=error,
            server_date=server_date,
            elapsed=elapsed,
        )

    def _read(self, reply: urllib3.BaseHTTPResponse, deadline: float) -> tuple[bytes, str | None]:
        """The whole body by ``deadline`` and within ``max_body``, or the problem."""
        encoding = reply.headers.get("Content-Encoding", "identity").lower()
        if encoding not in ("", "identity"):
            return b"", f"the answer is {encoding}-encoded, which the client never asks for"
        length = reply.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return b"", f"the answer is {int(length)} bytes, more than the {self.max_body} "\
                "bytes a billing answer may have"
        fired = threading.Event()

        def expire() -> None:
            fired.set()
            with contextlib.suppress(Exception):
                reply.shutdown()  # unblocks a read stuck on a slow or silent peer

        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), expire)
        watchdog.daemon = True
        watchdog.start()
        chunks: list[bytes] = []
        size = 0
        try:
            while True:
                chunk = reply.read1(65536, decode_content=False)
                if not chunk:
                    break
                size += len(chunk)
                if size > self.max_body:
                    return b"", f"the answer is longer than {self.max_body} bytes (cut off)"
                chunks.append(chunk)
                if time.monotonic() >= deadline:
                    fired.set()
                    break
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            if not fired.is_set():
                return b"", self._describe(exc)
        finally:
            watchdog.cancel()
        if fired.is_set():
            return b"", "timed out"
        return b"".join(chunks), None

    def _failed(self, error: str, started: float) -> Answer:
        return Answer(ApiStatus.COULD_NOT_CONNECT, error=error,
                      elapsed=time.monotonic() - started)

    def _describe(self, exc: BaseException) -> str:
        text = _describe(exc)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def status(self, identity: dict[str, str], nonce: str | None = None) -> Answer:
        body: dict[str, Any] = dict(identity)
        if nonce is not None:
            body["nonce"] = nonce
        return self.post("/billing/v1/status", body)

    def usage(self, records: list[dict[str, Any]]) -> Answer:
        return self.post("/billing/v1/usage", {"records": records})


def proxy_for(scheme: str, host: str) -> SplitResult | None:
    """The proxy (from HTTPS_PROXY/HTTP_PROXY, honouring NO_PROXY) for a host, if any.

    The usual loopback names never go through a proxy; other 127.0.0.0/8 addresses
    follow NO_PROXY like any host (the proxy tests use 127.0.0.2 as the endpoint).
    """
    if host in ("localhost", "::1", "127.0.0.1") or urllib.request.proxy_bypass(host):
        return None
    url = urllib.request.getproxies().get(scheme)
    if not url:
        return None
    parts = urlsplit(url if "://" in url else f"http://{url}")
    return parts if parts.hostname else None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib3.exceptions.NewConnectionError):  # a ConnectTimeoutError too
        return str(exc.args[-1] if exc.args else exc).split(": ", 1)[-1]
    if isinstance(exc, TimeoutError | urllib3.exceptions.TimeoutError):
        return "timed out"
    if isinstance(exc, urllib3.exceptions.ProxyError):
        return f"the proxy refused or failed: {exc.original_error}"
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        return _describe(exc.reason)
    text = str(exc) or type(exc).__name__
    return text
