"""The exception hierarchy: one base class, narrow subclasses.

Code inside the module raises these; the boundaries (CLI, transports, HTTP)
translate them into an exit code, an error envelope or a log line.
"""

from __future__ import annotations

from edge_module.errors import ErrorCode


class EdgeModuleError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(EdgeModuleError):
    """A setting is missing or invalid. ``key`` names it; the message says the fix."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class ModelError(EdgeModuleError):
    """A model file or descriptor cannot be loaded or run."""


class PayloadError(EdgeModuleError):
    """An input message cannot be turned into model input.

    ``code`` is stable and documented (edge_module/errors.py); clients branch on it.
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Refusal(EdgeModuleError):
    """The module may not serve a request now (unlicensed, metering buffer full, ...).

    ``code`` goes into the error envelope; ``details`` adds fields such as
    ``status`` or ``retryAfter``.
    """

    def __init__(self, code: ErrorCode, message: str, **details: object) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details
