"""The status page for the person at the device: ``GET /`` and its JSON, ``/status/page``.

One hand-written page (``static/status.html``, ``.css``, ``.js``, package data read once at
start), no build step and nothing fetched from elsewhere: it works on a line with no
internet. The page shows the licence state with its reason and fix, the offline grace left
(counted down from the module's trusted clock: the document carries the remaining seconds,
the page counts from the moment it received them, never from the browser's wall clock), the
metering backlog, each model's recent throughput, latency and errors, the transports, and
the error codes answered lately. It refreshes itself from ``/status/page`` every few seconds;
the server also renders the basics into the HTML, so without JavaScript they are still
there (as of the page's load).

Auth: with ``Http:ApiKey`` set, ``/status/page`` needs the key like every protected route
(``Authorization: Bearer`` or ``X-Api-Key``). ``GET /`` answers everyone, but renders data
only for a request that carries the key; otherwise it is an empty page with a form that
asks for the key, keeps it in the tab's ``sessionStorage`` and sends it as ``X-Api-Key``
from JavaScript. The key never appears in a URL, a log line or the page. The stylesheet and
script (``/static/status.*``) hold no data and are public.

Threads: ``/`` and ``/status/page`` run in the HTTP handler pool (they read the ledger's
figures); the static files are answered on the event loop from memory.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from edge_module.api.http import HttpApi
from edge_module.api.router import Request, Response

REFRESH_SECONDS = 2.0
SECURITY_HEADERS = {
    # Only the module's own files: no inline script, no other origin, no framing.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
STATIC_TYPES = {"css": "text/css; charset=utf-8", "js": "text/javascript; charset=utf-8"}


@dataclass(frozen=True)
class PageSources:
    """Where the page's figures come from (the app wires them; each is cheap)."""

    status: Callable[[], dict[str, Any]]  # the /status body, without a fresh key check
    activity: Callable[[], dict[tuple[str, str], dict[str, Any]]]
    recent_errors: Callable[[], list[dict[str, Any]]]
    transports: Callable[[], list[dict[str, Any]]]
    ledger_cap: Callable[[], dict[str, Any]]
    trusted_ms: Callable[[], int]
    window_seconds: int


def _static(name: str) -> str:
    return (resources.files("edge_module.api") / "static" / name).read_text("utf-8")


def human_duration(seconds: float) -> str:
    """``3 h 12 min``, ``12 min 5 s``, ``42 s``; days above two days."""
    s = max(0, int(seconds))
    if s >= 2 * 86400:
        return f"{s // 86400} d {s % 86400 // 3600} h"
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60} min"
    if s >= 60:
        return f"{s // 60} min {s % 60} s"
    return f"{s} s"


def human_bytes(n: float) -> str:
    """Binary units, as ``Metering:MaxLedgerMb`` counts: ``1.2 MiB``."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GiB"


def _iso(value: str | None) -> str:
    if not value:
        return "never"
    try:
        when = datetime.fromisoformat(value).astimezone(UTC)
    except ValueError:
        return value
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


class StatusPage:
    def __init__(self, http: HttpApi, sources: PageSources) -> None:
        self.http = http
        self.sources = sources
        self._template = _static("status.html")
        self._files = {f"/static/status.{ext}": Response(
            200, _static(f"status.{ext}").encode(), STATIC_TYPES[ext], SECURITY_HEADERS)
            for ext in STATIC_TYPES}
        http.route("GET", "/", self._page, protected=False)
        http.route("GET", "/status/page", self._document)
        for path, response in self._files.items():
            http.router.add("GET", path, lambda _, r=response: r, blocking=False)

    def document(self) -> dict[str, Any]:
        """The page's JSON: the /status body plus what only the page shows."""
        src = self.sources
        body = src.status()
        activity = src.activity()
        for model in body.get("models", []):
            model["activity"] = activity.get((model.get("name"), model.get("version")))
        body["trustedTimeMs"] = src.trusted_ms()
        body["ledgerCap"] = src.ledger_cap()
        body["transports"] = src.transports()
        body["recentErrors"] = src.recent_errors()
        body["windowSeconds"] = src.window_seconds
        body["refreshSeconds"] = REFRESH_SECONDS
        return body

    def _document(self, _: Request) -> Response:
        return Response.json(200, self.document(), SECURITY_HEADERS)

    def _page(self, request: Request) -> Response:
        authorized = self.http.authorized(request)
        fields = self._basics(self.document()) if authorized else self._locked()
        fields["auth"] = "open" if not self.http.key_required else \
            ("given" if authorized else "required")
        page = self._template
        for name, value in fields.items():
            page = page.replace("{{" + name + "}}", value)
        return Response(200, page.encode(), "text/html; charset=utf-8", SECURITY_HEADERS)

    @staticmethod
    def _locked() -> dict[str, str]:
        dash = "—"
        return {"state": "locked", "state_text": "Enter the API key to see the status",
                "reason": "This module's HTTP API needs its key (Http:ApiKey).",
                "fix": "Type the key in the form above; it is kept in this browser tab only.",
                "grace_left": dash, "grace_seconds": "", "pending": dash, "oldest": dash,
                "last_upload": dash, "quarantined": dash, "disk": dash, "models": ""}

    @staticmethod
    def _basics(doc: dict[str, Any]) -> dict[str, str]:
        """The values the server renders into the HTML (escaped), for a page without
        JavaScript; the script replaces them with live ones."""
        grace = doc.get("grace") or {}
        state = str(grace.get("state", "unknown"))
        remaining = grace.get("remainingSeconds")
        backlog = doc.get("backlog") or {}
        cap = doc.get("ledgerCap") or {}
        oldest = backlog.get("oldestPendingAgeSeconds")
        models = "".join(
            f"<li>{html.escape(str(m.get('name')))} version "
            f"{html.escape(str(m.get('version')))}: {html.escape(str(m.get('state')))}</li>"
            for m in doc.get("models", []))
        words = {"online": "Online: licensed and serving",
                 "grace": "Offline grace: serving, the billing endpoint is not answering",
                 "gated": "Gated: not serving"}
        fields = {
            "state": state,
            "state_text": words.get(state, state),
            "reason": f"{doc.get('apiStatus')}: {doc.get('apiStatusMessage')}",
            "fix": re.sub(r"\((\d+) s left\)",
                          lambda m: f"({human_duration(int(m.group(1)))} left)",
                          str(doc.get("remedy") or "")),
            "grace_left": "none (no lease)" if remaining is None else
            f"{human_duration(remaining)} if the link drops now" if state == "online" else
            f"{human_duration(remaining)} left",
            "grace_seconds": "" if remaining is None else str(int(remaining)),
            "pending": f"{int(backlog.get('pending', 0)):,}",
            "oldest": "none waiting" if oldest is None else human_duration(oldest),
            "last_upload": _iso(backlog.get("lastSuccessfulDrainAt")),
            "quarantined": f"{int(backlog.get('quarantined', 0)):,}",
            "disk": f"{human_bytes(backlog.get('ledgerBytes', 0))} of "
                    f"{human_bytes(cap.get('maxLedgerBytes', 0))}",
            "models": models,
        }
        return {k: v if k == "models" else html.escape(v) for k, v in fields.items()}
