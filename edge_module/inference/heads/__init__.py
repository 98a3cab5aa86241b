"""Output heads: small plug-ins, one file each, chosen by the descriptor's ``head`` field.

``HEADS`` maps a name to the head's factory; ``build_head`` builds the one a
descriptor names and, when the graph fits it not, says which heads could serve
the model instead. A model repository can build one head per model: heads keep
no state between answers. Built while a model loads (any thread loading it).
"""

from __future__ import annotations

from edge_module.inference.descriptor import Descriptor
from edge_module.inference.heads.base import (
    Answering,
    Frame,
    Head,
    HeadFactory,
    HeadMismatch,
    Shapes,
)
from edge_module.inference.heads.centerface import CenterFaceHead
from edge_module.inference.heads.classification import ClassificationHead
from edge_module.inference.heads.detection import DetectionHead
from edge_module.inference.heads.tensor import TensorHead

__all__ = ["HEADS", "Answering", "Frame", "Head", "HeadMismatch", "build_head", "register"]

HEADS: dict[str, HeadFactory] = {
    "classification": ClassificationHead.build,
    "centerface": CenterFaceHead.build,
    "detection": DetectionHead.build,
    "tensor": TensorHead.build,
}


def register(name: str, factory: HeadFactory) -> None:
    """Add a head under ``name`` (a plug-in of one's own, or a test's)."""
    HEADS[name] = factory


def could_serve(descriptor: Descriptor, shapes: Shapes) -> list[str]:
    """The heads whose load checks this descriptor and graph pass."""
    fitting = []
    for name, factory in HEADS.items():
        trial = descriptor.model_copy(update={"head": name, "headOptions": {}})
        try:
            factory(trial, shapes)
        except HeadMismatch:
            continue
        fitting.append(name)
    return fitting


def build_head(descriptor: Descriptor, shapes: Shapes) -> Head:
    """The head the descriptor names, checked against the graph's output shapes.

    Raises HeadMismatch naming the reason and the heads that could serve instead.
    """
    factory = HEADS.get(descriptor.head)
    if factory is None:
        raise HeadMismatch(f"unknown head {descriptor.head!r}; known heads: "
                           f"{', '.join(sorted(HEADS))}")
    try:
        return factory(descriptor, shapes)
    except HeadMismatch as exc:
        others = [n for n in could_serve(descriptor, shapes) if n != descriptor.head]
        raise HeadMismatch(
            f"the {descriptor.head} head cannot serve it: {exc}; heads that could serve "
            f"it as described: {', '.join(others) or 'none'}") from None
