"""Local state under ``Data:Path``: the installation id (Azure's ``containerId``)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from edge_module.exceptions import ConfigError


def ensure_data_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError("Data:Path", f"folder {path} is not writable ({exc.strerror}); fix: "
                          "point Data:Path at a writable folder or mount a volume there") from exc
    return path


def installation_id(data_path: Path) -> str:
    """A UUID made on first start and kept in ``Data:Path/container-id``."""
    file = data_path / "container-id"
    try:
        value = file.read_text().strip()
        uuid.UUID(value)
        return value
    except (OSError, ValueError):
        pass
    value = str(uuid.uuid4())
    tmp = file.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        handle.write(value + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, file)
    return value
