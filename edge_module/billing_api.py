"""Client of the Billing API v1 (docs/billing-api.yaml): status and usage calls.

Every answer is mapped to one of the Azure AI containers statuses: Valid,
Invalid, Mismatch, ContainerUseUnauthorized, OutOfQuota, BillingEndpointBusy,
CouldNotConnect (no connection or a timeout), Unknown (anything else). Fields
the client does not know are ignored, so the API can grow (leases, licences).

One keep-alive connection is reused per client; every call has a timeout, so a
blackholed endpoint costs at most ``timeout`` seconds and never blocks callers
of other components.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import socket
import ssl
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import SplitResult, urlsplit

KEY_HEADER = "Ocp-Apim-Subscription-Key"


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


class BillingClient:
    def __init__(self, base_url: str, api_key: str, timeout: float = 10.0,
                 ca_file: str | None = None) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self._key = api_key
        self.timeout = timeout
        self._context = ssl.create_default_context(cafile=ca_file) \
            if parts.scheme == "https" else None
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            proxy = proxy_for(self.scheme, self.host)
            host, port = (proxy.hostname or "", proxy.port or 80) if proxy else \
                (self.host, self.port)
            if self.scheme == "https":
                self._conn = http.client.HTTPSConnection(
                    host, port, timeout=self.timeout, context=self._context)
            else:
                self._conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
            if proxy is not None:  # CONNECT tunnel; TLS is still end to end with the endpoint
                self._conn.set_tunnel(self.host, self.port)
            self._conn.connect()
            # http.client sends a large body apart from its headers; with Nagle on, each
            # upload waits for the peer's delayed ACK (~40 ms).
            self._conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def post(self, path: str, body: dict[str, Any]) -> Answer:
        return self._post_bytes(path, json.dumps(body, separators=(",", ":")).encode())

    def post_raw_usage(self, records: list[str]) -> Answer:
        """POST /usage with records already serialised (the uploader's fast path)."""
        data = ('{"records":[' + ",".join(records) + "]}").encode()
        return self._post_bytes("/billing/v1/usage", data)

    def get(self, path: str) -> Answer:
        return self._request("GET", path, None)

    def _post_bytes(self, path: str, data: bytes) -> Answer:
        return self._request("POST", path, data)

    def _request(self, method: str, path: str, data: bytes | None) -> Answer:
        headers = {KEY_HEADER: self._key, "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        started = time.monotonic()
        with self._lock:
            for attempt in (1, 2):  # one silent retry when a kept-alive socket went stale
                try:
                    conn = self._connection()
                    conn.request(method, self.prefix + path, body=data, headers=headers)
                    reply = conn.getresponse()
                    raw = reply.read()
                    break
                except (http.client.RemoteDisconnected, BrokenPipeError,
                        ConnectionResetError) as exc:
                    self._drop()
                    if attempt == 2 or time.monotonic() - started > self.timeout:
                        return Answer(ApiStatus.COULD_NOT_CONNECT, error=_describe(exc),
                                      elapsed=time.monotonic() - started)
                except (OSError, http.client.HTTPException) as exc:
                    self._drop()
                    return Answer(ApiStatus.COULD_NOT_CONNECT, error=_describe(exc),
                                  elapsed=time.monotonic() - started)
        elapsed = time.monotonic() - started
        try:
            parsed = json.loads(raw) if raw else {}
        except ValueError:
            parsed = {}
        if not isinstance(parsed, dict):
            parsed = {}
        server_date = None
        if reply.getheader("Date"):
            try:
                server_date = email.utils.parsedate_to_datetime(
                    reply.getheader("Date", "")).timestamp()
            except (TypeError, ValueError):
                server_date = None
        return Answer(
            status=status_from_http(reply.status, parsed),
            http_status=reply.status,
            body=parsed,
            retry_after=parse_retry_after(reply.getheader("Retry-After")),
            error=None if reply.status == 200 else str(parsed.get("message") or reply.reason),
            server_date=server_date,
            elapsed=elapsed,
        )

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def status(self, identity: dict[str, str]) -> Answer:
        return self.post("/billing/v1/status", identity)

    def usage(self, records: list[dict[str, Any]]) -> Answer:
        return self.post("/billing/v1/usage", {"records": records})


def proxy_for(scheme: str, host: str) -> SplitResult | None:
    """The proxy (from HTTPS_PROXY/HTTP_PROXY, honouring NO_PROXY) for a host, if any."""
    if host in ("localhost", "::1") or host.startswith("127.") or \
            urllib.request.proxy_bypass(host):
        return None
    url = urllib.request.getproxies().get(scheme)
    if not url:
        return None
    parts = urlsplit(url if "://" in url else f"http://{url}")
    return parts if parts.hostname else None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text
