"""One ``perf_analyzer`` point (server, protocol, concurrency) and its CSV, parsed.

The binary comes from the ``tritonclient==2.51.0`` wheel, unpacked by
``bench/peers/install.sh`` into ``.cache/peers/perf_analyzer/`` with
``libcudart.so.12`` beside it. Each point is bounded: a fixed number of
measurement windows of fixed length (stability is not waited for: the
stability threshold is set so high that any three windows count as stable),
and a hard subprocess timeout on top. Runs on the harness's main thread.
"""

from __future__ import annotations

import csv
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROTOCOLS = {  # label -> (perf_analyzer -i, input tensor format)
    "gRPC": ("grpc", "binary"),
    "HTTP binary": ("http", "binary"),
    "HTTP JSON": ("http", "json"),
}


@dataclass(frozen=True)
class Budget:
    """Per point: ``trials`` windows of ``window_ms``. perf_analyzer judges stability on
    its last three windows, and with the threshold at 999 % any three pass: so a point
    is exactly three windows (``trials`` >= 3 is only the cap it must not hit first)."""

    window_ms: int
    trials: int

    @property
    def timeout_s(self) -> float:
        return 30 + self.trials * self.window_ms / 1000 * 3


def binary(cache: Path) -> Path:
    path = cache / "perf_analyzer" / "bin" / "perf_analyzer"
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"{path} missing: run bench/peers/install.sh (make bench-peers)")
    return path


def measure(cache: Path, model: str, port: int, protocol: str, concurrency: int,
            input_data: Path, workdir: Path, budget: Budget) -> dict[str, Any]:
    """Throughput and latency percentiles of one point; raises RuntimeError on failure."""
    kind, tensor_format = PROTOCOLS[protocol]
    tag = f"{model}-{port}-{kind}-{tensor_format}-c{concurrency}"
    out_csv = workdir / f"{tag}.csv"
    log = workdir / f"{tag}.log"
    args = [str(binary(cache)), "-m", model, "-u", f"127.0.0.1:{port}", "-i", kind,
            "-b", "1", "--concurrency-range", f"{concurrency}:{concurrency}",
            "--input-data", str(input_data),
            "--measurement-mode", "time_windows",
            "--measurement-interval", str(budget.window_ms),
            "--max-trials", str(budget.trials), "--stability-percentage", "999",
            "--percentile", "99", "-f", str(out_csv)]
    if kind == "http":
        args += ["--input-tensor-format", tensor_format, "--output-tensor-format", tensor_format]
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        [str(cache / "perf_analyzer" / "lib"), env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    with open(log, "wb") as sink:
        try:
            done = subprocess.run(args, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                  timeout=budget.timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"perf_analyzer took over {budget.timeout_s:.0f} s; "
                               f"see {log}") from exc
    if done.returncode != 0 or not out_csv.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"perf_analyzer exit {done.returncode}: {' | '.join(tail)} "
                           f"(full log: {log})")
    return parse_csv(out_csv)


def parse_csv(path: Path) -> dict[str, Any]:
    """The row of perf_analyzer's ``-f`` CSV: infer/s and client-side p50/p99 in ms."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise RuntimeError(f"{path}: no measurement row")
    row = rows[0]
    try:
        return {"inferPerS": round(float(row["Inferences/Second"]), 1),
                "p50Ms": round(float(row["p50 latency"]) / 1000, 3),
                "p99Ms": round(float(row["p99 latency"]) / 1000, 3)}
    except (KeyError, ValueError) as exc:
        raise RuntimeError(f"{path}: unexpected CSV columns {list(row)}") from exc
