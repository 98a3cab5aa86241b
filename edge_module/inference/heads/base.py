"""The output-head contract: what a head is given at load and per answer, and what it returns.

A head turns one model's raw outputs into the ``results`` of an answer. It is
built once per loaded model (``HeadFactory``), from the descriptor and the
output shapes of a one-item probe run, and refuses there (``HeadMismatch``)
when the graph does not fit it, so a model that loaded never fails to shape an
answer. ``shape`` runs on the pipeline's commit thread, before the answer's
usage is recorded: a head that raises makes that answer ``InternalError`` and
unbilled, unless it raises ``Refusal`` (an answer too large for this request):
then that code, also unbilled. Heads hold no state between answers, so several models (each with
its own head) can be served at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from edge_module.exceptions import ModelError
from edge_module.inference.descriptor import Descriptor

Shapes = Mapping[str, tuple[int, ...]]
Options = TypeVar("Options", bound=BaseModel)


@dataclass(frozen=True)
class Frame:
    """Where one decoded image came from: its original size and how it was fitted.

    A point ``(x, y)`` in the model's input maps back to the original image as
    ``((x - pad_x) / scale_x, (y - pad_y) / scale_y)``.
    """

    width: int
    height: int
    scale_x: float = 1.0
    scale_y: float = 1.0
    pad_x: float = 0.0
    pad_y: float = 0.0


@dataclass(frozen=True)
class Answering:
    """The live answer settings (``TopK``, ``ScoreThreshold``) a head may use, and how the
    request asked for tensors (``"output": "npy"``: base64 ``.npy`` instead of lists)."""

    top_k: int = 3
    score_threshold: float = 0.0
    tensors: Literal["json", "npy"] = "json"


class HeadMismatch(ModelError):
    """The graph or descriptor does not fit this head; the message says why."""


class Head(Protocol):
    """One model's output head."""

    name: str
    outputs: tuple[str, ...]  # the graph outputs ``shape`` reads, fetched in this order

    def shape(self, outputs: Mapping[str, np.ndarray], frames: Sequence[Frame | None],
              answering: Answering) -> list[dict[str, Any]]:
        """One result per item; ``outputs`` hold exactly this answer's items (batch first)."""


HeadFactory = Callable[[Descriptor, Shapes], Head]


def options(schema: type[Options], descriptor: Descriptor) -> Options:
    """The descriptor's ``headOptions``, validated by the head's own schema."""
    try:
        return schema.model_validate(descriptor.headOptions)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise HeadMismatch(f"headOptions.{where}: {first['msg']}") from None


def one_output(descriptor: Descriptor, shapes: Shapes) -> str:
    """The output a single-output head reads: ``output.name``, or the graph's only one."""
    if descriptor.output is not None:
        if descriptor.output.name not in shapes:
            raise HeadMismatch(f"output {descriptor.output.name!r} is not in the graph")
        return descriptor.output.name
    if len(shapes) != 1:
        raise HeadMismatch(f"the graph has {len(shapes)} outputs: name the one to read "
                           "in the descriptor's output.name")
    return next(iter(shapes))
