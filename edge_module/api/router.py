"""Typed HTTP requests and responses, and a small router of method + path patterns.

Owns no thread and no socket: ``server.py`` calls :meth:`Router.match` on its event loop
thread and runs the matched handler there (``blocking=False``) or in its bounded handler
pool (``blocking=True``, the default). Patterns are literal segments and ``{name}``
placeholders (one segment each), e.g. ``/v2/models/{name}/versions/{version}/infer``;
a prefix route takes every path under it and gets the rest in ``params["rest"]``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_module.errors import ErrorCode

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Request:
    """One complete request: the body is fully read (and within ``Http:MaxBodyBytes``)."""

    method: str
    path: str  # percent-decoded, valid UTF-8, no trailing slash (except "/")
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes = b""
    client: str = ""
    params: Mapping[str, str] = field(default_factory=dict)

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name.lower(), default)

    def arg(self, name: str, default: str | None = None) -> str | None:
        """The first value of query parameter ``name``."""
        values = self.query.get(name)
        return values[0] if values else default

    def json(self) -> Any:
        """The body parsed as JSON; raises :class:`HttpError` 400 when it is not."""
        try:
            return json.loads(self.body)
        except (ValueError, RecursionError) as exc:
            raise HttpError(400, ErrorCode.INVALID_JSON, f"the body is not JSON ({exc})",
                            "send a JSON document with Content-Type: application/json") from None


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, body: Any, headers: Mapping[str, str] | None = None) -> Response:
        return cls(status, json.dumps(body).encode(), "application/json", dict(headers or {}))

    @classmethod
    def error(cls, status: int, code: ErrorCode, message: str, fix: str,
              headers: Mapping[str, str] | None = None) -> Response:
        """A coded error body, shaped like the MQTT error envelopes' ``error`` object."""
        return cls.json(status, {"error": {"code": code.value, "message": message, "fix": fix}},
                        headers)


def oip_error(response: Response) -> Response:
    """A coded error body in the OIP v2 shape: ``error`` is text (what Triton's and KServe's
    clients read), the module's ``code``, ``message``, ``fix`` (and extras) beside it."""
    if response.status < 400 or response.content_type != "application/json":
        return response
    try:
        body = json.loads(response.body)
    except ValueError:
        return response
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return response
    reshaped = {k: v for k, v in body.items() if k != "error"}
    reshaped.update(error)
    reshaped["error"] = f"{error.get('code')}: {error.get('message')}"
    return Response.json(response.status, reshaped, response.headers)


class HttpError(Exception):
    """Raised by a handler (or the server) to answer with a coded error instead of 500."""

    def __init__(self, status: int, code: ErrorCode, message: str, fix: str,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.response = Response.error(status, code, message, fix, headers)


SyncHandler = Callable[[Request], Response]
AsyncHandler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: str
    handler: SyncHandler | AsyncHandler
    blocking: bool  # True: run in the handler pool; False: on the event loop (must not block)
    is_async: bool
    regex: re.Pattern[str]


def _compile(pattern: str, prefix: bool) -> re.Pattern[str]:
    parts = _PLACEHOLDER.split(pattern)
    regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^/]+)"
                    for i, p in enumerate(parts))
    return re.compile(f"^{regex}(?:/(?P<rest>.*))?$" if prefix else f"^{regex}$")


def normalise(path: str) -> str:
    return path.rstrip("/") or "/"


class Router:
    def __init__(self) -> None:
        self._routes: list[Route] = []

    def add(self, method: str, pattern: str, handler: SyncHandler | AsyncHandler, *,
            blocking: bool = True, is_async: bool = False, prefix: bool = False) -> None:
        """Route ``method pattern`` to ``handler``; the first route added wins."""
        method = method.upper()
        if method not in METHODS:
            raise ValueError(f"unknown HTTP method {method}")
        self._routes.append(Route(method, normalise(pattern), handler, blocking, is_async,
                                  _compile(normalise(pattern), prefix)))

    def routes(self) -> list[Route]:
        return list(self._routes)

    def patterns(self) -> list[str]:
        return sorted({r.pattern for r in self._routes})

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]] | Response:
        """The route for ``method path`` and its parameters, or a 404/405 response."""
        allowed: set[str] = set()
        for route in self._routes:
            found = route.regex.match(path)
            if found is None:
                continue
            if route.method == method or (method == "HEAD" and route.method == "GET"):
                params = {k: v for k, v in found.groupdict().items() if v is not None}
                if "rest" in route.regex.groupindex:
                    params.setdefault("rest", "")
                return route, params
            allowed.add(route.method)
        if allowed:
            return Response.error(405, ErrorCode.METHOD_NOT_ALLOWED,
                                  f"{method} is not allowed on {path}",
                                  f"use {', '.join(sorted(allowed))}",
                                  {"Allow": ", ".join(sorted(allowed))})
        return Response.error(404, ErrorCode.NOT_FOUND, f"no route {path}",
                              f"use one of {', '.join(self.patterns())}")
