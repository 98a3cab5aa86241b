"""Direct methods: a name -> handler table with IoT Hub's status conventions.

Handlers return ``(status, body)``; the table answers 404 for an unknown
method (listing the known ones) and handlers answer 400 for a bad payload.
Method names are matched case-insensitively.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edge_module.exceptions import EdgeModuleError

Handler = Callable[[Any], tuple[int, Any]]


class BadPayload(EdgeModuleError, ValueError):
    """A method's payload is not what it takes; the message says what it takes."""


class Methods:
    def __init__(self) -> None:
        self._handlers: dict[str, tuple[str, Handler]] = {}

    def add(self, name: str, handler: Handler) -> None:
        self._handlers[name.lower()] = (name, handler)

    @property
    def names(self) -> list[str]:
        return sorted(name for name, _ in self._handlers.values())

    def call(self, name: str, payload: Any) -> tuple[int, Any]:
        entry = self._handlers.get(name.lower())
        if entry is None:
            return 404, {"error": f"unknown method {name!r}", "methods": self.names}
        try:
            return entry[1](payload)
        except BadPayload as exc:
            return 400, {"error": str(exc)}


def options(payload: Any, allowed: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """A method payload as a dict of known options; raises BadPayload otherwise."""
    if payload is None or payload == "":
        return {}
    if not isinstance(payload, dict):
        raise BadPayload(f"the payload must be a JSON object with {_list(allowed)}, "
                         f"got {type(payload).__name__}")
    unknown = sorted(set(payload) - set(allowed))
    if unknown:
        raise BadPayload(f"unknown field {unknown[0]!r}; this method takes {_list(allowed)}")
    for key, kind in allowed.items():
        if key in payload and (not isinstance(payload[key], kind) or
                               isinstance(payload[key], bool)):
            raise BadPayload(f"{key} has the wrong type ({type(payload[key]).__name__})")
    return dict(payload)


def _list(allowed: dict[str, Any]) -> str:
    return ", ".join(allowed) if allowed else "no fields ({} or nothing)"
