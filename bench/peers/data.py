"""Input data shared by every peer and the limit: real images, the module's own preprocessing.

Four 640x480 JPEG frames (the ones ``bench.run`` feeds the module) go through the
module's codec (decode, resize, normalise) into ``float32[3, 224, 224]`` tensors.
The same tensors feed ``perf_analyzer`` (``--input-data`` JSON, base64 of the raw
float32 bytes: its default random input decodes as NaN/inf floats) and the bare
``session.run`` loop. Runs on the harness's main thread.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

INPUT = "x"
OUTPUT = "fetch_name_0"
SHAPE = (3, 224, 224)
CLASSES = 4


def tensors(model_path: Path, count: int = 4) -> list[np.ndarray]:
    """``count`` preprocessed frames, exactly as the module would feed the model."""
    from bench.run import camera_frames
    from edge_module.inference.codecs import Codec, Limits
    from edge_module.inference.models import Model

    codec = Codec(Model(model_path), Limits(8 << 20, 64))
    out = []
    for frame in camera_frames(count):
        item = np.ascontiguousarray(codec.decode(frame).items[0], dtype=np.float32)
        if item.shape != SHAPE or not np.isfinite(item).all():
            raise RuntimeError(f"preprocessed frame has shape {item.shape} or non-finite values")
        out.append(item)
    return out


def write_input_data(items: list[np.ndarray], path: Path) -> Path:
    """perf_analyzer's ``--input-data`` file: one entry per frame, rotated through."""
    data = [{INPUT: {"b64": base64.b64encode(item.tobytes()).decode(),
                     "shape": list(SHAPE)}} for item in items]
    path.write_text(json.dumps({"data": data}))
    return path


def bare_loop(model_path: Path, items: list[np.ndarray], seconds: float) -> dict[str, Any]:
    """The limit: ``session.run`` in a tight loop on the same tensors, batch 1 and 8.

    Same onnxruntime as the peers, default session options (as the peers use).
    """
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    configs = []
    for batch in (1, 8):
        stacks = [np.stack([items[(i + j) % len(items)] for j in range(batch)])
                  for i in range(len(items))]
        session.run([OUTPUT], {INPUT: stacks[0]})
        done, i = 0, 0
        started = time.perf_counter()
        deadline = started + seconds
        latencies = []
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            session.run([OUTPUT], {INPUT: stacks[i % len(stacks)]})
            latencies.append((time.perf_counter() - t0) * 1000)
            done += batch
            i += 1
        rate = done / (time.perf_counter() - started)
        p50, p99 = np.percentile(latencies, [50, 99])
        configs.append({"batch": batch, "inferPerS": round(rate, 1),
                        "p50Ms": round(float(p50), 3), "p99Ms": round(float(p99), 3)})
    best = max(configs, key=lambda c: float(c["inferPerS"]))
    return {"best": best, "configs": configs}
