"""Who is billed: the container type, its version and the installation id.

Both ``metering/`` (every usage record names it) and ``licensing/`` (status
checks, leases and licences are bound to it) use it, so it lives beside them,
not in either. Immutable; any thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_module import CONTAINER_TYPE, __version__
from edge_module.state import installation_id


@dataclass(frozen=True)
class Identity:
    """``containerType``, ``containerVersion`` and ``containerId`` of Azure's records."""

    container_type: str
    container_version: str
    container_id: str

    def as_dict(self) -> dict[str, str]:
        return {"containerType": self.container_type,
                "containerVersion": self.container_version,
                "containerId": self.container_id}


def installation_identity(data_path: Path) -> Identity:
    """This build and the installation under ``Data:Path`` (its id made at first start)."""
    return Identity(CONTAINER_TYPE, __version__, installation_id(data_path))
