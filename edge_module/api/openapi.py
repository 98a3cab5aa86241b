"""``/openapi.json`` and ``/swagger``: the HTTP API described from the router's own routes.

The document is generated at request time from :class:`Router` (every method + pattern,
``{name}`` placeholders as path parameters, each handler's docstring's first line as its
summary), so it cannot drift from the routes served. ``/swagger`` is a small self-contained
HTML page listing them (no CDN, no vendored Swagger UI: the module runs offline).
Runs on the HTTP event loop thread; pure functions.
"""

from __future__ import annotations

import html
import inspect
from typing import Any

from edge_module import __version__
from edge_module.api.router import _PLACEHOLDER, Router

ERROR_SCHEMA = {
    "type": "object",
    "description": "A coded error. On /v2 routes `error` is text (Triton's shape) and "
    "`code`, `message`, `fix` sit beside it; elsewhere `error` is an object with them.",
    "properties": {"error": {}, "code": {"type": "string"}, "message": {"type": "string"},
                   "fix": {"type": "string"}},
}


SUMMARIES = {
    "/health": "alive (open)", "/ContainerLiveness": "alive (open)",
    "/ready": "ready to serve, or 503 with the reason (open)",
    "/ContainerReadiness": "ready to serve, or 503 with the reason (open)",
    "/metrics": "Prometheus metrics (open)", "/status": "licence and metering status",
    "/records/usage-logs": "usage logs by month", "/openapi.json": "this document",
    "/swagger": "this document as a page",
    "/": "the status page for people (figures need the API key when one is set)",
    "/status/page": "the status page's JSON: /status plus activity, links, recent errors",
    "/static/status.css": "the status page's stylesheet (open)",
    "/static/status.js": "the status page's script (open)",
    "/v2": "OIP v2 server metadata",
    "/v2/health/live": "OIP v2 liveness (open)", "/v2/health/ready": "OIP v2 readiness (open)",
    "/v2/models/stats": "statistics of every model",
    "/v2/models/{name}": "model metadata",
    "/v2/models/{name}/versions/{version}": "model version metadata",
    "/v2/models/{name}/ready": "model readiness",
    "/v2/models/{name}/versions/{version}/ready": "model version readiness",
    "/v2/models/{name}/stats": "model statistics (Triton's extension)",
    "/v2/models/{name}/versions/{version}/stats": "model version statistics",
    "/v2/models/{name}/infer": "inference: JSON or binary tensors (docs/oip-v2.md)",
    "/v2/models/{name}/versions/{version}/infer": "inference on one version",
    "/v2/repository/index": "every model version and its state",
    "/v2/repository/models/{name}/load": "load a model (repository catalogs only)",
    "/v2/repository/models/{name}/unload": "unload a model (repository catalogs only)",
}


def _summary(pattern: str, handler: Any) -> str:
    if pattern in SUMMARIES:
        return SUMMARIES[pattern]
    doc = inspect.getdoc(handler) or ""
    return doc.splitlines()[0] if doc else ""


def openapi(router: Router, title: str = "edge-module") -> dict[str, Any]:
    """The OpenAPI 3.0 document of every route ``router`` serves."""
    paths: dict[str, dict[str, Any]] = {}
    for route in router.routes():
        names = _PLACEHOLDER.findall(route.pattern)
        operation: dict[str, Any] = {
            "summary": _summary(route.pattern, route.handler) or f"{route.method} {route.pattern}",
            "parameters": [{"name": n, "in": "path", "required": True,
                            "schema": {"type": "string"}} for n in names],
            "responses": {"200": {"description": "success"},
                          "default": {"description": "a coded error", "content": {
                              "application/json": {"schema": ERROR_SCHEMA}}}},
        }
        path = route.pattern + ("/{rest}" if "rest" in route.regex.groupindex else "")
        if "rest" in route.regex.groupindex:
            operation["parameters"].append({"name": "rest", "in": "path", "required": True,
                                            "schema": {"type": "string"}})
        paths.setdefault(path, {})[route.method.lower()] = operation
    return {"openapi": "3.0.3",
            "info": {"title": title, "version": __version__,
                     "description": "Health, readiness, metrics, status, usage logs and the "
                     "Open Inference Protocol v2 (docs/oip-v2.md)."},
            "paths": dict(sorted(paths.items()))}


def swagger_page(document: dict[str, Any]) -> str:
    """A self-contained HTML page listing the document's operations."""
    rows = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            rows.append(f"<tr><td><code>{html.escape(method.upper())}</code></td>"
                        f"<td><code>{html.escape(path)}</code></td>"
                        f"<td>{html.escape(operation['summary'])}</td></tr>")
    title = html.escape(document["info"]["title"])
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title} API</title>"
            "<style>body{font-family:sans-serif;margin:2em}td{padding:.2em .8em}"
            "tr:nth-child(even){background:#f3f3f3}</style></head><body>"
            f"<h1>{title} {html.escape(document['info']['version'])}</h1>"
            "<p>The machine-readable description: <a href='/openapi.json'>/openapi.json</a>."
            "</p><table><tr><th>Method</th><th>Path</th><th>What</th></tr>"
            + "".join(rows) + "</table></body></html>")
