"""Result and error envelopes: the JSON the module answers every input with."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from edge_module.inference.models import Provenance


def shape_results(scores: np.ndarray, labels: list[str], top_k: int,
                  score_threshold: float = 0.0) -> list[dict[str, Any]]:
    """One ``{"label", "score", "topK"}`` per item, from the model's class scores.

    Classes scoring below ``score_threshold`` are left out of ``topK``; when even
    the best one is below it, ``label`` is null (the model is not confident) while
    ``score`` still gives the best score. Raises when the scores do not fit the
    labels: the pipeline shapes every answer before its usage is recorded, so an
    answer that cannot be shaped is an error and never billed.
    """
    k = min(top_k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    results: list[dict[str, Any]] = []
    for row, top in zip(scores, order, strict=True):
        best = round(float(row[top[0]]), 6)
        ranked = [{"label": labels[i], "score": round(float(row[i]), 6)} for i in top
                  if row[i] >= score_threshold]
        results.append({"label": ranked[0]["label"] if ranked else None, "score": best,
                        "topK": ranked})
    return results


def result_envelope(request_id: str, provenance: Provenance, results: list[dict[str, Any]],
                    timing_ms: dict[str, float]) -> bytes:
    """``{"id", "model", "results", "timingMs"}`` (results from ``shape_results``)."""
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
