"""Local state under ``Data:Path``: the installation id (Azure's ``containerId``) and the
module's own signing key."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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


def module_signing_key(data_path: Path) -> Ed25519PrivateKey:
    """The module's own Ed25519 key (signs exported usage logs), made at first start."""
    path = data_path / "module-signing-key.pem"
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if isinstance(key, Ed25519PrivateKey):
            return key
    key = Ed25519PrivateKey.generate()
    tmp = path.with_suffix(".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    # created 0600: the private key is never readable by others, not even for a moment
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    os.replace(tmp, path)
    return key


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
    try:
        with open(tmp, "w") as handle:
            handle.write(value + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, file)
    except OSError as exc:
        raise ConfigError("Data:Path", f"cannot store the installation id in {file} "
                          f"({exc.strerror}); fix: free space under Data:Path (or mount a "
                          "larger volume there)") from exc
    return value
