"""The model repository's rules, in process: layout, version policy, failures, unload,
memory budget, routing by field with batches per model, and a swap under steady load.

Real parts: the built-in digits and telemetry models copied into a temporary
repository, real onnxruntime sessions, a real SQLite ledger; only the transport is
the recording one of tests/fast/conftest.py.
"""

from __future__ import annotations

import base64
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_module.config import BUILTIN_MODELS, PipelineSettings
from edge_module.inference.catalog import ModelState
from edge_module.inference.models import Model
from edge_module.inference.repository import ModelRepository, read_config
from edge_module.metering.ledger import Ledger
from edge_module.metering.meter import LedgerMeter
from edge_module.metrics import Metrics
from edge_module.pipeline import Pipeline
from edge_module.transport.base import Inbound
from simulator.datasets import digit_image, digits_split
from tests.fast.conftest import RecordingTransport

TELEMETRY_ROW = [60.0, 2.0, 50.0, 1.0, 5.0, 40.0, 20.0, 2900.0]


def add_version(root: Path, builtin: str, version: int, name: str | None = None) -> Path:
    """Copy a built-in model into ``root/<name>/<version>/`` as model.onnx + model.json."""
    folder = root / (name or builtin) / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(BUILTIN_MODELS / f"{builtin}.onnx", folder / "model.onnx")
    shutil.copy(BUILTIN_MODELS / f"{builtin}.json", folder / "model.json")
    return folder


def load(path: Path, intra: int, inter: int) -> Model:
    model = Model(path, intra, inter)
    model.warm_up()
    return model


def states(repo: ModelRepository) -> dict[tuple[str, str], str]:
    return {(i.name, i.version): i.state.value for i in repo.versions()}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    add_version(root, "digits", 1)
    add_version(root, "telemetry", 1)
    return root


def test_two_models_load_and_resolve_by_name_and_version(root: Path) -> None:
    repo = ModelRepository(root, load)
    repo.scan()
    assert states(repo) == {("digits", "1"): "ready", ("telemetry", "1"): "ready"}
    digits = repo.resolve("digits", None)
    assert digits is not None and digits.provenance.name == "digits"
    assert digits.provenance.version == "1" and len(digits.provenance.sha256) == 64
    assert repo.resolve("digits", "1") is digits
    assert repo.resolve("telemetry", None) is not digits
    assert repo.resolve("digits", "2") is None and repo.resolve("nope", None) is None
    # two models and no Model:Default: an input naming none has no model
    assert repo.default_name is None and repo.resolve(None, None) is None
    chosen = ModelRepository(root, load, default="telemetry")
    chosen.scan()
    assert chosen.default.provenance.name == "telemetry"
    # Model:Default=<model>:<version> pins the version that answers unnamed inputs
    add_version(root, "digits", 2)
    (root / "digits" / "config.json").write_text(json.dumps({"versionPolicy": {"all": {}}}))
    chosen.set_default("digits:1")
    chosen.scan()
    assert chosen.default.provenance.version == "1"
    newest = chosen.resolve("digits", None)
    assert newest is not None and newest.provenance.version == "2"
    chosen.set_default("digits")
    assert chosen.default.provenance.version == "2"


def test_latest_policy_swaps_in_a_new_version_and_old_batches_still_run(root: Path) -> None:
    repo = ModelRepository(root, load)
    repo.scan()
    old = repo.resolve("digits", None)
    assert old is not None
    add_version(root, "digits", 2)
    repo.scan()
    new = repo.resolve("digits", None)
    assert new is not None and new is not old and new.provenance.version == "2"
    assert ("digits", "1") not in states(repo)  # latest 1: version 1 retired
    # a batch that took the old version before the swap still finishes on it
    batch = np.zeros((1, *old.item_shape), dtype=np.float32)
    assert old.run(batch)["probabilities"].shape == (1, 10)


def test_specific_and_all_policies(root: Path) -> None:
    add_version(root, "digits", 2)
    add_version(root, "digits", 3)
    (root / "digits" / "config.json").write_text(
        json.dumps({"versionPolicy": {"specific": {"versions": [1, 3]}}}))
    repo = ModelRepository(root, load)
    repo.scan()
    assert sorted(v for n, v in states(repo) if n == "digits") == ["1", "3"]
    m = repo.resolve("digits", None)
    assert m is not None and m.provenance.version == "3"
    (root / "digits" / "config.json").write_text(json.dumps({"versionPolicy": {"all": {}}}))
    repo.scan()
    assert sorted(v for n, v in states(repo) if n == "digits") == ["1", "2", "3"]
    with pytest.raises(ValueError, match="numVersions"):
        bad = root / "bad.json"
        bad.write_text(json.dumps({"versionPolicy": {"latest": {"numVersions": 0}}}))
        read_config(bad)


def test_a_broken_model_fails_with_its_reason_and_the_others_keep_serving(root: Path) -> None:
    repo = ModelRepository(root, load)
    repo.scan()
    serving = repo.resolve("digits", None)
    broken = root / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"not an onnx graph")
    shutil.copy(BUILTIN_MODELS / "digits.json", broken / "model.json")
    # a newer digits version whose file is garbage: version 1 keeps serving
    bad_digits = add_version(root, "digits", 2)
    (bad_digits / "model.onnx").write_bytes(b"\x08\x07garbage")
    repo.scan()
    infos = {(i.name, i.version): i for i in repo.versions()}
    assert infos[("broken", "1")].state is ModelState.FAILED
    assert "onnxruntime cannot load" in (infos[("broken", "1")].reason or "")
    assert infos[("digits", "2")].state is ModelState.FAILED
    assert infos[("digits", "1")].state is ModelState.READY
    assert repo.resolve("digits", None) is serving
    assert repo.resolve("broken", None) is None
    # fixed on disk: the next scan loads it and retires version 1
    add_version(root, "digits", 2)
    repo.scan()
    fixed = repo.resolve("digits", None)
    assert fixed is not None and fixed.provenance.version == "2"
    assert ("digits", "1") not in states(repo)


def test_unload_and_load_again(root: Path) -> None:
    repo = ModelRepository(root, load)
    repo.scan()
    assert [i.state for i in repo.unload("telemetry")] == [ModelState.UNLOADED]
    assert repo.resolve("telemetry", None) is None
    repo.scan()  # the poll leaves an unloaded model alone
    assert repo.resolve("telemetry", None) is None
    assert [i.state for i in repo.load("telemetry")] == [ModelState.READY]
    assert repo.resolve("telemetry", None) is not None
    with pytest.raises(KeyError):
        repo.load("absent")
    with pytest.raises(KeyError):
        repo.unload("absent")
    assert {i.name for i in repo.index()} == {"digits", "telemetry"}


def test_a_memory_budget_refuses_a_load_with_the_reason(root: Path) -> None:
    # digits.onnx is 38 kB: a budget of 1 MB holds it, then the measured RSS of the
    # loads (each a session, some MB) decides; a budget below the file refuses it outright
    repo = ModelRepository(root, load, memory_budget_mb=1)
    big = root / "big" / "1"
    big.mkdir(parents=True)
    shutil.copy(BUILTIN_MODELS / "digits.json", big / "model.json")
    (big / "model.onnx").write_bytes(b"\0" * (2 * 1024 * 1024))
    repo.scan()
    info = {(i.name, i.version): i for i in repo.versions()}[("big", "1")]
    assert info.state is ModelState.FAILED
    assert "Model:MemoryBudgetMb" in (info.reason or "")
    estimates = repo.memory()
    assert all(v >= 0 for v in estimates.values())
    assert all(s["rssMb"] >= 0 for s in repo.status())


def _pipe(repo: ModelRepository, transport: RecordingTransport, ledger: Ledger,
          **settings: object) -> Pipeline:
    metrics = Metrics()
    pipe = Pipeline(repo, PipelineSettings.model_validate(settings), transport, metrics,
                    LedgerMeter(ledger, metrics))
    pipe.start()
    return pipe


def _digit_json(pixels: np.ndarray, **fields: str) -> bytes:
    return json.dumps({"image": base64.b64encode(digit_image(pixels)).decode(),
                       **fields}).encode()


def test_inputs_are_routed_by_field_and_topic_and_unknown_models_are_not_billed(
        root: Path, transport: RecordingTransport, ledger: Ledger) -> None:
    _, x, _, _ = digits_split()
    repo = ModelRepository(root, load, default="digits")
    repo.scan()
    pipe = _pipe(repo, transport, ledger, MaxQueueDelayMs=20)
    try:
        sent = [
            Inbound(digit_image(x[0]), "in/digits"),  # no name: the default model
            Inbound(_digit_json(x[1], model="digits", version="1"), "in"),
            Inbound(json.dumps({"model": "telemetry", "tensor": TELEMETRY_ROW}).encode(),
                    "in"),
            Inbound(json.dumps({"tensor": TELEMETRY_ROW}).encode(), "in/t",
                    model="telemetry"),  # as a topic level names it
            Inbound(_digit_json(x[2], model="nope", id="u1"), "in"),
            Inbound(_digit_json(x[3], model="digits", version="9"), "in"),
            Inbound(json.dumps({"model": 5, "tensor": TELEMETRY_ROW}).encode(), "in"),
        ]
        for inbound in sent:
            pipe.submit(inbound)
        transport.wait_answers(len(sent))
    finally:
        pipe.drain(5)
        pipe.stop()
    models = sorted(json.loads(body)["model"]["name"] for _, body in transport.results)
    assert models == ["digits", "digits", "telemetry", "telemetry"]
    errors = [json.loads(body)["error"] for _, body in transport.errors]
    assert [e["code"] for e in errors] == ["UnknownModel", "UnknownModel", "InvalidRequest"]
    assert json.loads(transport.errors[0][1])["id"] == "u1"
    assert ledger.pending == len(transport.results) == 4  # billed == answered


def test_a_version_swap_under_steady_load_loses_and_fails_nothing(
        root: Path, transport: RecordingTransport, ledger: Ledger) -> None:
    _, x, _, _ = digits_split()
    repo = ModelRepository(root, load, default="digits")
    repo.scan()
    pipe = _pipe(repo, transport, ledger, MaxBatchSize=8, MaxQueueDelayMs=2)
    total = 300
    swapped = threading.Event()

    def swap() -> None:
        time.sleep(0.05)
        add_version(root, "digits", 2)
        repo.scan()
        swapped.set()

    swapper = threading.Thread(target=swap)
    try:
        swapper.start()
        deadline = time.monotonic() + 20
        for i in range(total):
            pipe.submit(Inbound(digit_image(x[i % len(x)]), "in"))
            if i % 10 == 0:
                time.sleep(0.005)  # a steady stream across the swap
            assert time.monotonic() < deadline
        swapper.join(20)
        transport.wait_answers(total, timeout=20)
    finally:
        pipe.drain(5)
        pipe.stop()
    assert swapped.is_set()
    assert transport.errors == []
    assert len(transport.results) == total == ledger.pending
    versions = {json.loads(body)["model"]["version"] for _, body in transport.results}
    assert versions == {"1", "2"}  # the swap happened while inputs flowed
    # a catalog change makes the pipeline let go of the models it cached (a retired
    # version's session is freed once its last batch is done)
    assert pipe._servings
    repo.unload("telemetry")
    assert pipe._servings == {}


def test_interleaved_inputs_for_two_models_are_batched_per_model(
        root: Path, transport: RecordingTransport, ledger: Ledger) -> None:
    _, x, _, _ = digits_split()
    repo = ModelRepository(root, load, default="digits")
    repo.scan()
    metrics = Metrics()
    pipe = Pipeline(repo, PipelineSettings.model_validate(
        {"MaxBatchSize": 8, "MaxQueueDelayMs": 300, "DecodeWorkers": 1}), transport, metrics,
        LedgerMeter(ledger, metrics))
    telemetry = json.dumps({"model": "telemetry", "tensor": TELEMETRY_ROW}).encode()
    for i in range(16):  # queued before the workers start: A, B, A, B, ...
        pipe.submit(Inbound(digit_image(x[i]), "in", correlation_id=f"d{i}"))
        pipe.submit(Inbound(telemetry, "in", correlation_id=f"t{i}"))
    pipe.start()
    try:
        transport.wait_answers(32)
    finally:
        pipe.drain(5)
        pipe.stop()
    assert transport.errors == []
    runs = [line for line in metrics.render().decode().splitlines()
            if line.startswith("edge_module_inference_seconds_count ")]
    # one batch per model version at a time: 4 runs of 8, not 32 runs of one
    assert float(runs[0].split()[1]) <= 6, runs
    order = [json.loads(body)["id"] for _, body in transport.results]
    for prefix in ("d", "t"):  # each model answers in arrival order
        mine = [int(i[1:]) for i in order if i.startswith(prefix)]
        assert mine == sorted(mine)
    assert ledger.pending == 32


def test_a_load_whose_measured_memory_passes_the_budget_is_refused(root: Path) -> None:
    def heavy(path: Path, intra: int, inter: int) -> Model:
        model = load(path, intra, inter)
        if "telemetry" in str(path):  # this load really takes 40 MB more of RSS
            model.ballast = b"\x01" * (40 * 1024 * 1024)  # type: ignore[attr-defined]
        return model

    repo = ModelRepository(root, heavy, memory_budget_mb=20)
    repo.scan()
    infos = {i.name: i for i in repo.versions()}
    assert infos["digits"].state is ModelState.READY
    assert infos["telemetry"].state is ModelState.FAILED
    assert "added" in (infos["telemetry"].reason or "")
    assert "Model:MemoryBudgetMb" in (infos["telemetry"].reason or "")
    assert repo.resolve("telemetry", None) is None
    assert repo.resolve("digits", None) is not None
