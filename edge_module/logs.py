"""Logging: structlog, one JSON object per line, secrets scrubbed.

Formats: ``json`` (default), ``iotedge`` (the same line prefixed with the
syslog severity, e.g. ``<6>``, which ``iotedge logs`` and the GetModuleLogs
direct method filter on) and ``console`` (for people at a terminal).

Redaction runs last before rendering, on every event: fields whose name looks
secret are masked, and the literal values of the configured secrets are
replaced wherever they appear as a whole value (not glued to letters or
digits), including inside exception text. Values shorter than
``MIN_SCRUB_LENGTH`` are not scrubbed by value: a two-letter "secret" would
turn ordinary words into ``pro***y``; such values are still masked in fields
whose name looks secret, and ``ApiKey`` itself must be at least
``config.MIN_API_KEY_LENGTH`` characters long.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

import structlog

REDACTED = "***"
SECRET_NAME = re.compile(r"(api_?key|password|secret|token|signature|private)", re.IGNORECASE)
SYSLOG_SEVERITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}

MIN_SCRUB_LENGTH = 8

_secrets: list[str] = []
_pattern: re.Pattern[str] | None = None


def register_secrets(values: Iterable[str]) -> None:
    """Remember secret values so that they are scrubbed from every later log line.

    Values shorter than ``MIN_SCRUB_LENGTH`` are ignored (see the module docstring).
    """
    global _pattern
    for value in values:
        if len(value) >= MIN_SCRUB_LENGTH and value not in _secrets:
            _secrets.append(value)
    _secrets.sort(key=len, reverse=True)  # the longest first, so overlaps mask entirely
    if _secrets:
        alternatives = "|".join(re.escape(s) for s in _secrets)
        _pattern = re.compile(rf"(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])")


def scrub(text: str) -> str:
    """Replace every whole occurrence of a registered secret inside ``text``."""
    if _pattern is None:
        return text
    return _pattern.sub(REDACTED, text)


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: REDACTED if SECRET_NAME.search(str(k)) else _scrub_value(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub_value(v) for v in value]
    return value


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: mask secret-looking fields and registered secret values."""
    for key in list(event):
        if SECRET_NAME.search(key):
            event[key] = REDACTED
        else:
            event[key] = _scrub_value(event[key])
    return event


def _syslog_prefix(renderer: Any) -> Any:
    def render(logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
        severity = SYSLOG_SEVERITY.get(str(event.get("level", "info")), 6)
        return f"<{severity}> {renderer(logger, name, event)}"

    return render


def configure(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Set up structlog for the whole process (again, to change the level live)."""
    global _generation
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer()
        if fmt == "iotedge":
            renderer = _syslog_prefix(renderer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    root.handlers = [_StdlibBridge()]
    root.setLevel(logging.WARNING)  # libraries' own debug output stays off
    _generation += 1


class _StdlibBridge(logging.Handler):
    """Sends warnings of libraries that log with the standard library (the IoT SDK,
    paho) through the same JSON lines, redaction included."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = record.levelname.lower()
            method = level if level in ("debug", "info", "warning", "error") else "error"
            getattr(get_logger(record.name), method)(record.getMessage(),
                                                     source="library")
        except Exception:  # logging must never raise into the library
            self.handleError(record)


class _Logger:
    """A logger that follows ``configure``: rebound when the configuration changes.

    Module-level loggers are created at import, before ``configure`` runs and
    before any live ``Log:Level`` change; structlog binds a logger to the
    configuration of the moment, so this rebinds on the first call after a change.
    """

    __slots__ = ("_bound", "_generation", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._bound: Any = None
        self._generation = -1

    def __getattr__(self, method: str) -> Any:
        if self._generation != _generation:
            self._bound = structlog.get_logger().bind(logger=self._name)
            self._generation = _generation
        return getattr(self._bound, method)


_generation = 0


def get_logger(name: str) -> Any:
    """A logger carrying ``logger=<name>``."""
    return _Logger(name)
