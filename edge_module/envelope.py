"""Result and error envelopes: the JSON the module answers every input with.

The ``results`` come from the model's output head (``inference/heads/``).
"""

from __future__ import annotations

import json
from typing import Any

from edge_module.inference.models import Provenance


def result_envelope(request_id: str, provenance: Provenance, results: list[dict[str, Any]],
                    timing_ms: dict[str, float]) -> bytes:
    """``{"id", "model", "results", "timingMs"}`` (results from the model's head)."""
    body = {
        "id": request_id,
        "model": provenance.as_dict(),
        "results": results,
        "timingMs": {key: round(value, 3) for key, value in timing_ms.items()},
    }
    return json.dumps(body, separators=(",", ":")).encode()


def error_envelope(
    request_id: str, code: str, message: str, **extra: Any
) -> bytes:
    """``{"id", "error": {"code", "message", ...}}``."""
    error: dict[str, Any] = {"code": code, "message": message}
    error.update({k: v for k, v in extra.items() if v is not None})
    return json.dumps({"id": request_id, "error": error}, separators=(",", ":")).encode()
