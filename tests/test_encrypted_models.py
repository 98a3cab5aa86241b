"""Licence-protected models: encrypted on disk, decrypted in memory with a granted key."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from edge_module.config import BUILTIN_MODELS
from edge_module.inference.encryption import new_key
from simulator.billing import BillingSimulator
from tests.support import API_KEY, Collector, Module

TENSOR = json.dumps({"id": "e1", "tensor": [[[0.0] * 8] * 8]}).encode()


def encrypted_digits(folder: Path) -> tuple[Path, str]:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(BUILTIN_MODELS / "digits.onnx", folder / "digits.onnx")
    shutil.copy(BUILTIN_MODELS / "digits.json", folder / "digits.json")
    proc = subprocess.run([sys.executable, "-m", "edge_module", "model", "encrypt",
                           str(folder / "digits.onnx")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    (folder / "digits.onnx").unlink()  # only the encrypted file ships
    answer = json.loads(proc.stdout)
    encrypted = Path(answer["encrypted"])
    assert b"image" not in encrypted.read_bytes()  # the graph is not readable
    return encrypted, str(answer["key"])


def test_encrypted_model_runs_with_the_key_from_the_lease(
    start_module: Callable[..., Module], collector: Collector, billing: BillingSimulator,
    tmp_path: Path,
) -> None:
    model, key = encrypted_digits(tmp_path / "models")
    billing.state.model_keys["digits"] = key
    start_module(f"Model:Path={model}")
    collector.publish("em/in/x", TENSOR)
    (result,) = collector.wait("em/results", 1)
    assert result["model"]["name"] == "digits"
    plain = (BUILTIN_MODELS / "digits.onnx").read_bytes()
    import hashlib

    assert result["model"]["sha256"] == hashlib.sha256(plain).hexdigest()


def test_encrypted_model_runs_disconnected_with_the_licence_key(
    start_module: Callable[..., Module], collector: Collector, billing: BillingSimulator,
    tmp_path: Path,
) -> None:
    model, key = encrypted_digits(tmp_path / "models")
    billing.state.model_keys["digits"] = key
    proc = subprocess.run([sys.executable, "-m", "edge_module", "run", "Eula=accept",
                           f"Billing={billing.url}", f"ApiKey={API_KEY}",
                           "DownloadLicense=True", f"Mounts:License={tmp_path / 'lic'}",
                           f"Data:Path={tmp_path / 'data'}"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    start_module(f"Model:Path={model}", f"Mounts:License={tmp_path / 'lic'}", billing=None,
                 public_key=billing.public_key_b64)
    collector.publish("em/in/x", TENSOR)
    assert collector.wait("em/results", 1)[0]["id"] == "e1"


def test_wrong_or_missing_key_fails_with_a_clear_error_naming_the_model(
    billing: BillingSimulator, tmp_path: Path
) -> None:
    model, _ = encrypted_digits(tmp_path / "models")
    base = [sys.executable, "-m", "edge_module", "run", "Eula=accept", f"Billing={billing.url}",
            f"ApiKey={API_KEY}", f"Billing:PublicKey={billing.public_key_b64}",
            f"Model:Path={model}", "Http:Port=0"]
    missing = subprocess.run([*base, f"Data:Path={tmp_path / 'd1'}"], capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2
    assert "model digits is encrypted and no valid licence or lease grants its key" in \
        missing.stderr
    billing.state.model_keys["digits"] = base64.b64encode(new_key()).decode()
    wrong = subprocess.run([*base, f"Data:Path={tmp_path / 'd2'}"], capture_output=True,
                           text=True, timeout=60)
    assert wrong.returncode == 2
    assert "model digits cannot be decrypted" in wrong.stderr
