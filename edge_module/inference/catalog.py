"""The models the module serves, as the transports and the HTTP APIs see them.

A ``Catalog`` answers "which models, which versions, in which state, and which
one answers an input that names this model and version". Two implementations:
``SingleModel`` (one model from ``Model:Name``/``Model:Path``, today's module)
and the model repository (``Model:Repository``, issue 13), which loads several
models and versions and swaps them without downtime. Transports put the name a
client asked for on ``Inbound.model``/``Inbound.version``; the pipeline asks the
catalog; the Open Inference Protocol API (issue 14) lists and loads through it.

Any thread: implementations keep their own lock; ``resolve`` is on the hot path
and must not block on loading.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from edge_module.inference.models import Model


class ModelState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADED = "unloaded"


@dataclass(frozen=True)
class VersionInfo:
    """One version of one model as /status, the twin and /v2/repository/index show it."""

    name: str
    version: str
    state: ModelState
    reason: str | None = None  # why it failed or was unloaded
    sha256: str | None = None


@dataclass
class CatalogEvents:
    """Callbacks the app wires (metrics, reported properties); all optional."""

    changed: list[Callable[[], None]] = field(default_factory=list)


class Catalog(Protocol):
    def resolve(self, name: str | None, version: str | None) -> Model | None:
        """The ready model that answers an input naming ``name`` (None: the default
        model) and ``version`` (None: the policy's newest ready version); None when no
        such ready model exists (the input gets ``UnknownModel``)."""

    def versions(self) -> list[VersionInfo]:
        """Every model version known, with its state."""

    @property
    def default(self) -> Model:
        """The model that answers inputs naming none."""


class SingleModel:
    """One model, always ready: the module as it runs with ``Model:Name``/``Model:Path``."""

    def __init__(self, model: Model) -> None:
        self.model = model

    def resolve(self, name: str | None, version: str | None) -> Model | None:
        provenance = self.model.provenance
        if name not in (None, provenance.name):
            return None
        if version not in (None, provenance.version):
            return None
        return self.model

    def versions(self) -> list[VersionInfo]:
        p = self.model.provenance
        return [VersionInfo(p.name, p.version, ModelState.READY, sha256=p.sha256)]

    @property
    def default(self) -> Model:
        return self.model
